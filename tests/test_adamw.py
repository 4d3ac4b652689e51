"""minimoe.AdamW: torch's AdamW, bit for bit, plus a step count per row for tensors that grow rows."""

import pytest
import torch

import minimoe
from minimoe import optim
from minimoe.adapters.adamw import mark_rows


def _grads(shape, steps, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(steps)]


def _run(opt, params, grads):
    for step in range(len(grads[0])):
        for p, g in zip(params, grads):
            p.grad = g[step].clone()
        opt.step()


@pytest.mark.parametrize("dim", [0, 1])
def test_rows_that_share_a_count_step_exactly_as_torch_adamw(dim):
    init = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    ours = [mark_rows(torch.nn.Parameter(init.clone()), dim), torch.nn.Parameter(init.clone())]
    ref = [torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())]
    grads = [_grads((6, 5), 5, 1), _grads((6, 5), 5, 2)]
    _run(minimoe.AdamW(ours, lr=1e-2, weight_decay=0.1), ours, grads)
    _run(torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1), ref, grads)
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)


def test_inserted_rows_step_as_fresh_parameters_and_the_old_rows_as_before():
    """Rows 0..3 train 4 steps; two rows are inserted after row 1; 3 more steps. The old rows end exactly
    where a torch AdamW over them alone ends, the new rows where a fresh torch AdamW over them ends."""
    g = torch.Generator().manual_seed(0)
    old_init, new_init = torch.randn(4, 8, generator=g), torch.randn(2, 8, generator=g)
    p = mark_rows(torch.nn.Parameter(old_init.clone()), 0)
    opt = minimoe.AdamW([p], lr=1e-2, weight_decay=0.1)
    ref_old = torch.nn.Parameter(old_init.clone())
    ref_opt = torch.optim.AdamW([ref_old], lr=1e-2, weight_decay=0.1)
    before = _grads((4, 8), 4, 1)
    _run(opt, [p], [before])
    _run(ref_opt, [ref_old], [before])
    p = optim.reindex_param(opt, p, torch.tensor([0, 1, -1, -1, 2, 3]), 0, fill=new_init)
    assert opt.state[p]["step"].tolist() == [4, 4, 0, 0, 4, 4] and p.row_dim == 0
    ref_new = torch.nn.Parameter(new_init.clone())
    new_opt = torch.optim.AdamW([ref_new], lr=1e-2, weight_decay=0.1)
    after = _grads((6, 8), 3, 2)
    _run(opt, [p], [after])
    _run(ref_opt, [ref_old], [[g[[0, 1, 4, 5]] for g in after]])
    _run(new_opt, [ref_new], [[g[[2, 3]] for g in after]])
    assert torch.equal(p[[0, 1, 4, 5]], ref_old) and torch.equal(p[[2, 3]], ref_new)
    assert opt.state[p]["step"].tolist() == [7, 7, 3, 3, 7, 7]


def test_amsgrad_is_refused():
    with pytest.raises(ValueError, match="amsgrad"):
        minimoe.AdamW([torch.nn.Parameter(torch.zeros(2))], amsgrad=True)
