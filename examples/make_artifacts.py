"""Write a small TorchScript archive and a small ``torch.export`` program, for the tests and the docs.

    python examples/make_artifacts.py [FOLDER]     # writes FOLDER/mlp.pt and FOLDER/mlp.pt2

then, for instance, ``ember deploy FOLDER/mlp.pt2 --name mlp``. Both hold the same seeded MLP
(8 -> 16 -> 4) and take a batch of any size.
"""

import sys
import warnings
from pathlib import Path

import torch


class MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = torch.nn.Linear(8, 16)
        self.out = torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.out(torch.relu(self.hidden(x)))
        return y


def _mlp() -> MLP:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return MLP().eval()


def make_torchscript(path: str | Path) -> torch.nn.Module:
    """Write the MLP as TorchScript (``torch.jit.script`` + ``torch.jit.save``); return it, eager."""
    model = _mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated, still in use
        torch.jit.save(torch.jit.script(model), str(path))
    return model


def make_exported(path: str | Path) -> torch.nn.Module:
    """Write the MLP as a ``torch.export`` program with a dynamic batch dimension; return it, eager."""
    model = _mlp()
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model, (torch.randn(2, 8),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))
    return model


if __name__ == "__main__":
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    folder.mkdir(parents=True, exist_ok=True)
    make_torchscript(folder / "mlp.pt")
    make_exported(folder / "mlp.pt2")
    print(f"wrote {folder / 'mlp.pt'} and {folder / 'mlp.pt2'}")
