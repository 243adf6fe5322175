"""DualOpt under torch's distributed engines on CPU: DDP and FSDP2 over gloo, two processes.

Every test reads the answers of three requests, each run once per module
(``tests.common.distributed.run_workers``, ``_distributed_worker.py``):

- ``single``: one process, no process group, the references: the plain run
  with the whole global batch of 32 rows, and the run that emulates two ranks
  in one process (``micro=2``: each half batch's gradient, times 1/2, summed:
  the engines' arithmetic, see ``_distributed_worker.backward``);
- ``ddp`` and ``fsdp``: two ranks, 16 rows each.

What is expected, and why:

- DDP and the emulation compute the same gradient bit for bit (the sum of two
  numbers does not depend on the order, the scaling by 1/2 is exact), and DDP
  keeps a whole optimizer per rank: **bitwise** equal, both DualOpt paths.
- Against the plain single-process run the gradient's sums over the batch
  run in another order (two sums of 16 rows, then one addition, instead of one
  sum of 32), and each difference feeds the next step: the closed-loop budget
  of ``spec/TOLERANCES.md`` (1e-12 scaled) applies.
- FSDP2 gives every rank a ``Shard(0)`` of every parameter, so DualOpt's state
  must be sharded alike. The reference path is elementwise, so it is bitwise
  equal to the emulation. The fast path's fused Adam kernel (torch's
  ``_fused_adam_``) computes most elements of a tensor in SIMD lanes and the
  last ``numel % width`` in a scalar loop, which may round differently, and
  sharding changes which elements are which: measured here, a 4-element
  tensor and its two 2-element halves differ in the last bit in 1 of 200
  steps (the head's bias is such a tensor). Within the same budget, not bitwise.

Run: ``pytest -m distributed tests/torch/test_torch_distributed.py`` (CI: ``make test``).
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.common.distributed import once_per_session, report, run_workers
from dualopt.conformance.metrics import compare
from dualopt.conformance.problem import NAMES, make_problem
from dualopt.conformance.tolerances import CLOSED_BUDGET

pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.xdist_group("distributed")]

WORKER = "tests.torch._distributed_worker"
PATHS = {"fast": None, "reference": False}  # DualOpt(foreach=...)
# The default (fast) path trains the conformance problem's 25 epochs of 8 batches; the
# reference path, bitwise the engines' arithmetic, 6 epochs (keeps the suite short).
STEPS = {"fast": 200, "reference": 48}
WIDE_STEPS = 40  # 5 epochs of the 16-256-256-4 model (fold branch of the fast path)
FINETUNE = {f"dense_{i}/{w}" for i in (0, 1) for w in ("kernel", "bias")}  # mode "mixed": the head is scratch


def _train(name: str, foreach: bool | None, **kw: object) -> dict:
    path = "fast" if foreach is None else "reference"
    job = dict(name=name, kind="train", model="mlp", mode="mixed", optimizer="dualopt", steps=STEPS[path],
               foreach=foreach)
    job.update(kw)
    return job


def _model_jobs() -> list[dict]:
    jobs = []
    for path, foreach in PATHS.items():
        jobs.append(_train(f"mlp-{path}", foreach))
        jobs.append(_train(f"wide-{path}", foreach, model="wide", mode="scratch", steps=WIDE_STEPS))
    return jobs


NAN_CASES = {"ddp": [("input", "mlp")], "fsdp": [("input", "mlp"), ("shard", "mlp"), ("shard", "wide")]}


def _nan_jobs(engine: str) -> list[dict]:
    """``mlp`` in finetune: small tensors; ``wide`` in scratch: the fast path's large-tensor recheck."""
    jobs = []
    for path, foreach in PATHS.items():
        for where, model in NAN_CASES[engine]:
            jobs.append(dict(name=f"nan-{where}-{model}-{path}", kind="nan", model=model,
                             mode="finetune" if model == "mlp" else "scratch", optimizer="dualopt", where=where,
                             foreach=foreach))
    return jobs


CKPT_STEPS = 24  # saved after 12 (one of them skipped: a NaN input), then 12 more on both copies
CKPT_APIS = ("dcp", "dcp-flattened", "state_dict", "full_state_dict")  # see _distributed_worker.job_checkpoint


def _checkpoint_jobs() -> list[dict]:
    return [dict(name=f"ckpt-{api}", kind="checkpoint", model="mlp", mode="mixed", optimizer="dualopt",
                 steps=CKPT_STEPS, api=api) for api in CKPT_APIS]


@pytest.fixture(scope="session")
def single(tmp_path_factory: pytest.TempPathFactory) -> dict:
    jobs = _model_jobs()
    jobs += [dict(j, name=j["name"] + "-micro2", micro=2) for j in _model_jobs()]
    run = lambda: run_workers(WORKER, {"engine": "single", "jobs": jobs}, world=1)[0]["jobs"]  # noqa: E731
    return once_per_session(tmp_path_factory, "torch-single", run)


@pytest.fixture(scope="session")
def ddp(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    jobs = [_train("mlp-fast", None), _train("mlp-reference", False)] + _nan_jobs("ddp")
    run = lambda: [a["jobs"] for a in run_workers(WORKER, {"engine": "ddp", "jobs": jobs}, world=2)]  # noqa: E731
    return once_per_session(tmp_path_factory, "torch-ddp", run)


@pytest.fixture(scope="session")
def fsdp(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    jobs = _model_jobs() + _nan_jobs("fsdp") + [dict(name="finite", kind="finite")] + _checkpoint_jobs()
    run = lambda: [a["jobs"] for a in run_workers(WORKER, {"engine": "fsdp", "jobs": jobs}, world=2)]  # noqa: E731
    return once_per_session(tmp_path_factory, "torch-fsdp", run)


def _bitwise(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


def _initial(answer: dict) -> dict:
    """The job's initial weights as the worker reported them (the test process never imports torch)."""
    return answer["initial"]


# ----------------------------------------------------------------------------- DDP
@pytest.mark.parametrize("path", PATHS)
def test_ddp_is_bitwise_the_two_rank_arithmetic(ddp: list[dict], single: dict, path: str) -> None:
    rank0, rank1 = (r[f"mlp-{path}"] for r in ddp)
    assert len(rank0["trajectory"]) == STEPS[path] // 8
    assert _bitwise(rank0["trajectory"], rank1["trajectory"]), "DDP replicas diverged"
    assert _bitwise(rank0["trajectory"], single[f"mlp-{path}-micro2"]["trajectory"])


@pytest.mark.parametrize("path", PATHS)
def test_ddp_matches_the_single_process_run_within_the_closed_loop_budget(ddp: list[dict], single: dict,
                                                                           path: str) -> None:
    ref = single[f"mlp-{path}"]
    assert _bitwise([ref["initial"]], [make_problem().weights])
    dev = compare(ddp[0][f"mlp-{path}"]["trajectory"], ref["trajectory"], _initial(ref))
    assert not dev.problems
    report(f"torch DDP {path} vs one process", dev)
    # Measured: 1.6e-15 max abs (1.4e-15 scaled) fast path, 200 steps; 2.2e-16 reference path, 48 steps.
    assert dev.max_scaled <= CLOSED_BUDGET, dev


@pytest.mark.parametrize("path", PATHS)
def test_ddp_state_is_whole_on_every_rank(ddp: list[dict], path: str) -> None:
    for rank in ddp:
        r = rank[f"mlp-{path}"]
        assert r["steps"] == [STEPS[path]] and r["skipped"] == 0
        for name in NAMES:
            keys = {"exp_avg", "exp_avg_sq"} | ({"anchor"} if name in FINETUNE else set())
            assert set(r["layout"][name]) == keys, name
            for entry in r["layout"][name].values():
                assert not entry["dtensor"] and entry["local_shape"] == entry["param_local_shape"]
        assert r["fast_path"] == ({"fused": 6, "loop": 0} if path == "fast" else {"fused": 0, "loop": 0})


@pytest.mark.parametrize("path", PATHS)
def test_ddp_nonfinite_input_on_one_rank_is_skipped_by_all(ddp: list[dict], path: str) -> None:
    """A NaN in rank 0's rows reaches every rank through the all-reduce: all skip, nothing changes.

    (A NaN written into one replica's gradient *after* the all-reduce is not a
    DDP case: DDP's gradients are identical on every rank by construction.)
    """
    rs = [rank[f"nan-input-mlp-{path}"] for rank in ddp]
    for r in rs:
        assert (r["skipped"], r["unchanged"], r["steps_after_skip"]) == (1, True, [3])
    assert all(np.array_equal(rs[0]["final"][k], rs[1]["final"][k]) for k in NAMES)  # replicas still equal


# ----------------------------------------------------------------------------- FSDP2
@pytest.mark.parametrize("model", ["mlp", "wide"])
@pytest.mark.parametrize("path", PATHS)
def test_fsdp_state_and_anchors_are_dtensors_sharded_like_their_parameter(fsdp: list[dict], path: str,
                                                                          model: str) -> None:
    for rank in fsdp:
        r = rank[f"{model}-{path}"]
        assert r["steps"] == [STEPS[path] if model == "mlp" else WIDE_STEPS] and r["skipped"] == 0
        for name in NAMES:
            finetune = model == "mlp" and name in FINETUNE
            assert set(r["layout"][name]) == {"exp_avg", "exp_avg_sq"} | ({"anchor"} if finetune else set()), name
            shape = _initial(r)[name].shape[::-1]  # torch layout: Linear.weight is the transposed kernel
            for key, e in r["layout"][name].items():
                assert e["param_dtensor"] and e["dtensor"], (name, key)
                assert e["same_mesh"] and e["same_placements"] and e["placements"] == "(Shard(dim=0),)", (name, key, e)
                # Really sharded: each rank holds half of dim 0.
                assert e["local_shape"] == e["param_local_shape"] == (shape[0] // 2, *shape[1:]), (name, key, e)
                assert e["dtype"] == "torch.float64"
        # The fast path takes DTensors through its fused kernels, none through its reference loop.
        assert r["fast_path"] == ({"fused": 6, "loop": 0} if path == "fast" else {"fused": 0, "loop": 0})
        if model == "mlp":
            for name, anchor in r["anchors"].items():  # the full anchors are the initial weights
                assert np.array_equal(anchor, _initial(r)[name]), name


@pytest.mark.parametrize("model", ["mlp", "wide"])
def test_fsdp_reference_path_is_bitwise_the_two_rank_arithmetic(fsdp: list[dict], single: dict, model: str) -> None:
    rank0, rank1 = (r[f"{model}-reference"] for r in fsdp)
    assert _bitwise(rank0["trajectory"], rank1["trajectory"])
    assert _bitwise(rank0["trajectory"], single[f"{model}-reference-micro2"]["trajectory"])


@pytest.mark.parametrize("path", PATHS)
def test_fsdp_matches_the_single_process_run_within_the_closed_loop_budget(fsdp: list[dict], single: dict,
                                                                           path: str) -> None:
    """The conformance MLP against the plain single-process run (the budget is defined for this problem)."""
    got = fsdp[0][f"mlp-{path}"]["trajectory"]
    assert _bitwise(got, fsdp[1][f"mlp-{path}"]["trajectory"])
    dev = compare(got, single[f"mlp-{path}"]["trajectory"], _initial(single[f"mlp-{path}"]))
    assert not dev.problems
    report(f"torch FSDP2 {path} vs one process", dev)
    # Measured: 8.9e-16 max abs (1.3e-15 scaled) fast path, 200 steps; 2.2e-16 reference path, 48 steps.
    assert dev.max_scaled <= CLOSED_BUDGET, dev


@pytest.mark.parametrize("model", ["mlp", "wide"])
def test_fsdp_fast_path_matches_the_two_rank_arithmetic_within_the_closed_loop_budget(fsdp: list[dict],
                                                                                      single: dict,
                                                                                      model: str) -> None:
    """Against the emulation only the fast path's SIMD-body/scalar-tail rounding can differ (module docstring).

    The wide model is compared with the emulation, not with the plain run:
    splitting its 256-wide layers' batch sums in two moves the weights by
    1.9e-13 (scaled) after 40 steps in the single-process emulation itself,
    which is the summation order amplified by training, not the engine.
    """
    got = fsdp[0][f"{model}-fast"]["trajectory"]
    dev = compare(got, single[f"{model}-fast-micro2"]["trajectory"], _initial(single[f"{model}-fast-micro2"]))
    assert not dev.problems
    report(f"torch FSDP2 {model}-fast vs the two-rank arithmetic", dev)
    # Measured: mlp 7.5e-16 max abs (6.7e-16 scaled) after 200 steps; wide 2.2e-16 after 40.
    assert dev.max_scaled <= CLOSED_BUDGET, dev


@pytest.mark.parametrize(("where", "model"), NAN_CASES["fsdp"])
@pytest.mark.parametrize("path", PATHS)
def test_fsdp_nonfinite_gradient_on_one_rank_is_skipped_by_all(fsdp: list[dict], path: str, model: str,
                                                               where: str) -> None:
    """Every rank skips and keeps its shards and state bit for bit (``unchanged``), then trains on.

    ``input``: a NaN in rank 0's rows (the reduce-scatter spreads it).
    ``shard``: a NaN only in rank 0's shard of ``dense_1``'s gradient (after the reduce-scatter).

    The skip decision must be global: a reduction of a sharded DTensor is a
    ``Partial`` DTensor whose ``bool()`` reads only the local part; before the
    fix in ``backends/_torch_kernels._global_bool`` rank 1 stepped on here
    (``wide``, fast path: the large-tensor recheck).
    """
    for rank in fsdp:
        r = rank[f"nan-{where}-{model}-{path}"]
        assert (r["skipped"], r["unchanged"], r["steps_after_skip"]) == (1, True, [3])
        assert all(np.isfinite(r["final"][k]).all() for k in NAMES)


def test_fsdp_skip_decision_for_one_sharded_tensor_is_global(fsdp: list[dict]) -> None:
    """One ``distribute_tensor`` parameter per optimizer: small (8x4) and large (512x64, the sum-then-recheck branch).

    ``overflow``: finite 1e308 gradients whose sum is inf must be stepped.
    """
    answers = [rank["finite"] for rank in fsdp]
    assert answers[0] == answers[1]
    assert len(answers[0]) == 16
    for (size, where, foreach), (skipped, step) in answers[0].items():
        bad = where in ("rank0", "rank1")
        assert (skipped, step) == ((1, 0) if bad else (0, 1)), (size, where, foreach)


# ----------------------------------------------------------------------------- FSDP2 checkpoints
@pytest.mark.parametrize("api", CKPT_APIS)
def test_fsdp_checkpoint_with_torch_helpers_resumes_bitwise(fsdp: list[dict], api: str) -> None:
    """torch's own recipes, unchanged (``_distributed_worker.job_checkpoint``): the resumed run equals the uninterrupted one.

    What makes them work (``backends/torch/_optimizer.py``): DualOpt creates its whole
    state with the optimizer, so the fresh optimizer's ``get_state_dict`` is a
    complete load template (torch's ``_init_optim_state`` creates lazy state
    only when ``optimizer.state`` is empty, which the anchors prevent; before,
    ``dcp.load`` failed with "Missing optimizer state for parameter
    'dense_2.weight'"), and the format tag and skip counter ride in every
    param group, which the helpers keep (before, ``get_optimizer_state_dict``
    dropped the top-level ``"dualopt"`` entry and the load was refused).
    """
    for rank in fsdp:
        r = rank[f"ckpt-{api}"]
        assert "error" not in r, r.get("error")
        assert r["saved_skipped"] == r["resumed_skipped"] == 1
        assert r["resumed_steps"] == [CKPT_STEPS // 2 - 1]  # one of the first half's steps skipped
        assert r["resumed_keys"] == ["anchor", "exp_avg", "exp_avg_sq", "step"]
        assert all(np.array_equal(r["resumed"][k], r["uninterrupted"][k]) for k in NAMES), "resume is not bitwise"
        # The fresh model started from other weights (x0.5): its anchors are the restored ones.
        assert set(r["resumed_anchors"]) == FINETUNE
        assert all(np.array_equal(r["resumed_anchors"][k], r["initial_anchors"][k]) for k in FINETUNE)
        for name in NAMES:
            for key, e in r["layout"][name].items():
                assert e["dtensor"] and e["same_placements"] and e["local_shape"] == e["param_local_shape"], (name, key)
        # What was saved: every state tensor a Shard(0) DTensor (whole tensors for full_state_dict).
        layout = dict(r["saved_layout"])
        # Step counts: 0-d plain tensors, one per parameter (as torch's fused Adam saves them).
        steps = {k: layout.pop(k) for k in list(layout) if k.endswith("step")}
        assert len(steps) == len(NAMES) and all(v == ("Tensor", "()", ()) for v in steps.values()), steps
        assert len(layout) == len(NAMES) * 2 + len(FINETUNE), layout  # moments of all, anchors of the backbone
        if api == "full_state_dict":
            assert all(kind == "Tensor" and placements == "()" for kind, placements, _ in layout.values()), layout
        else:
            assert all(kind == "DTensor" and placements == "(Shard(dim=0),)"
                       for kind, placements, _ in layout.values()), layout
        if api.startswith("dcp"):
            assert sorted(f for f in r["files"] if f.endswith(".distcp")) == ["__0_0.distcp", "__1_0.distcp"]
            assert r["template_steps"] == [0]  # taking the template stepped nothing
