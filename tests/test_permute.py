"""Channel permutation for N:M (nm:permute=true): exact where absorbed, never a worse objective,
a skip code where no producer absorbs it, idempotence and option errors."""

import numpy as np
import pytest

from sparsec.errors import OptionError
from sparsec.graph import all_nodes
from sparsec.model_io import load_model, save_model
from sparsec.passes import patterns
from sparsec.passes.patterns import Code
from sparsec.passes.permute import absorber_permutation, apply_permutation, kept_score, match_absorber, search_permutation
from sparsec.pipeline import PassContext, parse_pass_specs, run_passes
from sparsec.sparsity import is_nm
from sparsec.testing import assert_equivalent


def _sites(model):
    for node in list(all_nodes(model)):
        site = patterns.match_linear_weight(node) if node.op_type == "MatMul" else None
        if site:
            yield site


@pytest.mark.parametrize("name,absorbed", [("tiny-llama", {"heads": 2, "ffn": 2}), ("tiny-bert", {"heads": 2, "ffn": 2})])
def test_permuted_unpruned_model_equals_the_original(zoo_path, tmp_path, name, absorbed):
    """Every absorbable site permuted (nothing pruned): the outputs match to fp tolerance."""
    model = load_model(zoo_path(name)).model
    kinds, codes = {}, set()
    for site in _sites(model):
        absorber = match_absorber(site, model)
        if not absorber:
            codes.add(absorber.code)
            continue
        before = site.weight.numpy().copy()
        score = np.abs(site.to_matrix(before))
        perm = absorber_permutation(absorber, score, 2, 4, rounds=20, seed=0)
        assert sorted(perm) == list(range(len(perm)))
        assert kept_score(score[:, perm], 2, 4) > kept_score(score, 2, 4)
        apply_permutation(absorber, perm, "test", "permuted")
        np.testing.assert_array_equal(site.weight.numpy(), before[perm])  # K is axis 0 of a MatMul weight
        kinds[absorber.kind] = kinds.get(absorber.kind, 0) + 1
    assert kinds == absorbed
    assert codes == {Code.PERMUTATION_UNABSORBED}  # Q/K/V, up/gate: normalized residual stream
    out = save_model(model, tmp_path / "permuted.onnx")
    assert_equivalent(zoo_path(name), out, atol=1e-5, rtol=1e-4, samples=2)


def test_head_permutation_stays_within_heads_and_shared_by_a_kv_group(zoo_path):
    model = load_model(zoo_path("tiny-llama")).model  # 4 query heads on 2 KV heads, head_dim 16
    site = next(s for s in _sites(model) if s.label.endswith("self_attn.o_proj"))
    absorber = match_absorber(site, model)
    score = np.random.default_rng(0).gamma(0.3, size=site.matrix_shape).astype(np.float32)
    perm = absorber_permutation(absorber, score, 2, 4, rounds=20, seed=0)
    heads = perm.reshape(4, 16)
    assert all(set(h // 16) == {i} for i, h in enumerate(heads))  # no channel leaves its head
    local = heads - 16 * np.arange(4)[:, None]
    np.testing.assert_array_equal(local[0], local[1])  # query heads 0 and 1 read KV head 0
    np.testing.assert_array_equal(local[2], local[3])
    assert (local[0] != np.arange(16)).any()


@pytest.mark.parametrize("seed", range(6))
def test_search_never_loses_score(seed):
    rng = np.random.default_rng(seed)
    rows, k = int(rng.integers(1, 40)), 4 * int(rng.integers(2, 40))
    score = rng.gamma(0.2 + seed / 4, size=(rows, k)).astype(np.float32)
    score[:, rng.integers(0, k, 3)] *= 20  # a few outlier channels, as in real activations
    perm = search_permutation(score, 2, 4, rounds=30, seed=seed)
    assert sorted(perm) == list(range(k))
    assert kept_score(score[:, perm], 2, 4) >= kept_score(score, 2, 4)


def test_search_separates_important_channels():
    """Four important channels in one group: 2:4 keeps two; a permutation keeps all four."""
    score = np.full((8, 16), 0.01, np.float32)
    score[:, :4] = 1.0
    perm = search_permutation(score, 2, 4, rounds=10, seed=0)
    assert kept_score(score[:, perm], 2, 4) == pytest.approx(8 * (4 + 4 * 0.01), rel=1e-5)


def test_pass_permutes_absorbed_sites_and_records_the_rest(zoo_path):
    model = load_model(zoo_path("tiny-llama")).model
    (record,) = run_passes(model, parse_pass_specs("nm:permute=true,min_params=0"), PassContext())
    table = record.extra["permutation"]
    assert len(table) == 4 and {r["producer"] for r in table} == {"ffn", "heads"}
    assert all(r["kept_after"] > r["kept_before"] and r["moved"] > 0 for r in table)
    assert record.skip_counts()[Code.PERMUTATION_UNABSORBED] == 10  # q, k, v, gate, up of 2 layers
    assert len(record.changed) == 14  # unabsorbed sites are still pruned, unpermuted
    for s in record.changed:
        site = next(x for x in _sites(model) if x.label == s.site)
        assert is_nm(site.to_matrix(site.weight.numpy()), 2, 4, axis=1)
    (again,) = run_passes(model, parse_pass_specs("nm:permute=true,min_params=0"), PassContext())
    assert not again.changed and again.extra["permutation"] == []  # idempotent: already 2:4


def test_magnitude_keeps_more_with_permutation(zoo_path):
    """The objective on the real rewrite: the |W| N:M keeps of each permuted weight is larger."""
    kept = {}
    for permute in (False, True):
        model = load_model(zoo_path("tiny-bert")).model
        originals = {s.label: np.abs(s.to_matrix(s.weight.numpy())).sum() for s in _sites(model)}
        (record,) = run_passes(model, parse_pass_specs(f"nm:permute={str(permute).lower()},min_params=0"), PassContext())
        kept[permute] = {s.label: np.abs(s.to_matrix(s.weight.numpy())).sum() / originals[s.label] for s in _sites(model)}
    permuted = [r["site"] for r in record.extra["permutation"] if r["moved"]]
    assert permuted
    for label in permuted:
        assert kept[True][label] > kept[False][label]


def test_kv_cache_and_shared_producers_are_not_permuted(zoo_path):
    model = load_model(zoo_path("tiny-llama-kv")).model
    o_proj = [s for s in _sites(model) if s.label.endswith("o_proj")]
    assert o_proj
    for site in o_proj:
        failure = match_absorber(site, model)
        assert not failure and failure.code == Code.PERMUTATION_UNABSORBED and "KV cache" in failure.message
    model = load_model(zoo_path("tiny-llama")).model
    down = next(s for s in _sites(model) if s.label.endswith("down_proj"))
    up = next(s for s in _sites(model) if s.label == down.label.replace("down_proj", "up_proj"))
    reader = up.node.outputs[0]
    model.graph.outputs.append(reader)  # the up projection's output now escapes the FFN
    failure = match_absorber(down, model)
    assert not failure and failure.code == Code.PERMUTATION_UNABSORBED


@pytest.mark.parametrize("spec,match", [
    ("nm:permute_rounds=-1", "permute_rounds"),
    ("nm:method=sparsegpt,targets=dense,reconstruct=block", "targets=pruned"),
])
def test_option_errors(spec, match):
    with pytest.raises(OptionError, match=match):
        parse_pass_specs(spec)
