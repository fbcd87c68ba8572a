"""The state layer between the loops and the decisions (DESIGN.md section 3).

One frozen value per model (:class:`ModelState`, folded from what a runner measured by :func:`fold`)
and the pure builders of every policy input (:func:`queue_snapshot`, :func:`model_view`,
:func:`worker_view`, :func:`start_delay_s`). The runner, the controller and the simulator engine
all build their snapshots here; none keeps a copy of these rules.
"""

from ember.state.model import RATE_SMOOTHING, GenerationStatistics, Measured, ModelState, Runner, RunnerStatistics, fold
from ember.state.seats import Seat, Seated, choose_seat, token_request
from ember.state.views import Hosted, kv_bytes_of, model_view, queue_snapshot, scale_view, start_delay_s, worker_view

__all__ = [
    "RATE_SMOOTHING",
    "GenerationStatistics",
    "Hosted",
    "Measured",
    "ModelState",
    "Runner",
    "RunnerStatistics",
    "Seat",
    "Seated",
    "choose_seat",
    "fold",
    "kv_bytes_of",
    "model_view",
    "queue_snapshot",
    "scale_view",
    "start_delay_s",
    "token_request",
    "worker_view",
]
