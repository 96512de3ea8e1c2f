"""Every block shape the GPU tables can launch (defaults and autotuning alternatives) gives
correct attention: the interpreter normally runs one shape (INTERPRETER_CONFIG), so here each
kernel is forced to each (BLOCK_M, BLOCK_N) of the tables in turn, with sequence lengths that
are not multiples of the blocks, causal diagonals, key-padding masks and varlen windows.
Warps and stages do not change results under the interpreter; the Hopper compile check covers
them."""
import pytest
import torch

import gptkern
from test_varlen import check as check_varlen

pytestmark = pytest.mark.skipif("triton" not in gptkern.available_backends(), reason="triton cannot run here")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def table_blocks() -> dict[str, list[tuple[int, int]]]:
    """kernel -> the distinct (BLOCK_M, BLOCK_N) of its table entries and alternatives."""
    from gptkern.kernels import attention

    blocks = {}
    for kernel, entries in attention._CONFIGS.items():
        found = {c[:2] for widths in entries.values() for c in widths if c is not None}
        for alternatives in attention._ALTERNATIVES.get(kernel, {}).values():
            found |= {c[:2] for width in alternatives for c in width}
        blocks[kernel] = sorted(found)
    return blocks


def block_sets() -> list[dict]:
    """Each kernel's blocks, zipped so that every shape of every kernel runs at least once."""
    blocks = table_blocks()
    count = max(len(b) for b in blocks.values())
    return [{k: b[i % len(b)] for k, b in blocks.items()} for i in range(count)]


@pytest.fixture
def forced_blocks(monkeypatch):
    """force(dict kernel -> (BLOCK_M, BLOCK_N)): the launchers use exactly those blocks."""
    from gptkern.kernels import attention

    launched = set()
    original_launch = attention.AttnConfig.launch

    def recorded_launch(self):
        launched.add((self.block_m, self.block_n))
        return original_launch(self)

    def force(chosen: dict):
        monkeypatch.setattr(attention, "configs",
                            lambda kernel, *args: (attention.AttnConfig(*chosen[kernel], 4, 1),))
        monkeypatch.setattr(attention.AttnConfig, "launch", recorded_launch)
        return launched

    return force


def test_tables_have_shapes_the_interpreter_does_not_run():
    """The check below is not empty: the tables hold non-square and non-64 blocks."""
    blocks = table_blocks()
    assert all(len(b) >= 3 for b in blocks.values())
    assert any(m != n for b in blocks.values() for m, n in b)


@pytest.mark.slow
@pytest.mark.parametrize("blocks", block_sets(), ids=lambda b: "-".join(f"{k}{m}x{n}" for k, (m, n) in b.items()))
def test_every_table_block_shape_is_correct(blocks, forced_blocks):
    from test_attention import check as check_dense

    launched = forced_blocks(blocks)
    dtype = torch.float32
    rand = lambda *shape: torch.randn(*shape, device=DEVICE, dtype=dtype)  # noqa: E731
    # dense, L != S and not block multiples: causal (top-left), GQA, and a key-padding mask
    check_dense("triton", rand(1, 2, 150, 16), rand(1, 1, 139, 16), rand(1, 1, 139, 24), is_causal=True,
                enable_gqa=True)
    keep = torch.rand(2, 1, 1, 77, device=DEVICE) > 0.3
    check_dense("triton", rand(2, 1, 45, 16), rand(2, 1, 77, 16), rand(2, 1, 77, 16), mask=keep)
    # varlen, ragged with empty and one-row sequences: causal (bottom-right) with a window
    check_varlen("triton", dtype, [0, 1, 150, 37], [3, 1, 140, 37], h=2, hk=1, causal=True, window=(40, 0))
    assert launched == set(blocks.values())  # the kernels ran with the forced blocks


def test_block_sets_cover_every_shape():
    seen = {k: set() for k in table_blocks()}
    for blocks in block_sets():
        for k, b in blocks.items():
            seen[k].add(b)
    assert seen == {k: set(b) for k, b in table_blocks().items()}
