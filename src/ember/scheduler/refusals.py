"""What a refused generative request is told: which objective, why, and when to retry.

Every refusal names the objective it would break (TTFT, the caller's timeout, or TPOT), whether only
the wait is the problem (a load, every seat taken: retry after ``retry_after_s``) or the model's
own measured speed (retrying sooner will not help; it is measured again by a probe within the
Retry-After delay), and what the operator can change.
"""

from __future__ import annotations

import math

from ember.config import Deployment
from ember.errors import DeadlineUnmeetable
from ember.policies.token_admission import TokenAdmission, TokenRequest
from ember.policies.token_latency import TokenLatencyModel

__all__ = ["late", "unmeetable"]


def unmeetable(
    d: Deployment,
    model: TokenLatencyModel,
    view: TokenRequest,
    decided: TokenAdmission,
    *,
    hard: bool,
    loading: bool,
) -> DeadlineUnmeetable:
    """The refusal at admission of the request ``view`` shows, as ``decided``; ``hard``: its deadline is
    the caller's timeout; ``loading``: the model is not hot."""
    name = d.name
    retry = max(decided.retry_after_s, 0.001)
    allowed_ms = 1000.0 * (view.ttft_deadline - view.now)
    limit = f"the request's timeout ({allowed_ms:.0f} ms)" if hard else f"its TTFT objective ({d.ttft_slo_ms:g} ms)"
    later = f"retry in {_seconds(retry)}"
    if decided.on == "tpot":
        step_ms = 1000.0 * model.admission_step_s(view.batch + 1, view.context)
        if decided.too_slow:
            return DeadlineUnmeetable(
                f"model '{name}' needs {step_ms:.0f} ms per output token even alone by its latest "
                f"measurements, past its TPOT objective ({d.tpot_slo_ms:g} ms). It is measured again (one "
                f"request served as a probe) within {_seconds(retry)}; until then retrying will not help. "
                f"Deploy it with a longer --tpot-slo-ms, or let it answer late (`ember update {name} "
                "--on-unmeetable best-effort`)",
                retry_after_s=retry,
            )
        return DeadlineUnmeetable(
            f"model '{name}' runs {view.batch} sequences; one more would take {step_ms:.0f} ms per output "
            f"token, past its TPOT objective ({d.tpot_slo_ms:g} ms); {later}",
            retry_after_s=retry,
        )
    prefill_ms = 1000.0 * model.admission_prefill_s(view.prompt_tokens)
    if decided.too_slow:
        return DeadlineUnmeetable(
            f"model '{name}' needs {prefill_ms:.0f} ms to read a prompt of about {view.prompt_tokens} tokens "
            f"by its latest measurements, past {limit}. It is measured again (one request served as a probe) "
            f"within {_seconds(retry)}; until then retrying will not help. Deploy it with a longer "
            f"--ttft-slo-ms, or let it answer late (`ember update {name} --on-unmeetable best-effort`)",
            retry_after_s=retry,
        )
    why = "it is being loaded" if loading else "every seat is taken"
    predicted_ms = prefill_ms + 1000.0 * view.wait_s
    return DeadlineUnmeetable(
        f"model '{name}' is predicted to give its first token in {predicted_ms:.0f} ms ({why}), past {limit}; {later}",
        retry_after_s=retry,
    )


def late(d: Deployment, waited_s: float, *, hard: bool, loading: bool) -> DeadlineUnmeetable:
    """The refusal of an admitted request whose first token can no longer come in time while it waits."""
    what = "the request's timeout" if hard else f"its TTFT objective ({d.ttft_slo_ms:g} ms)"
    why = "while the model was being loaded" if loading else "while every seat was taken"
    return DeadlineUnmeetable(
        f"model '{d.name}' could not start the request in time for {what}: it waited "
        f"{1000.0 * waited_s:.0f} ms {why}; retry in 1 s",
        retry_after_s=1.0,
    )


def _seconds(seconds: float) -> str:
    return f"{max(1, math.ceil(seconds))} s"
