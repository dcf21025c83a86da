"""The pass framework: registry, options schema, provenance postcondition."""

from dataclasses import dataclass

import pytest

from sparsec.errors import OptionError, PassError
from sparsec.graph import all_nodes
from sparsec.model_io import load_model
from sparsec.pipeline import (
    Kind, Pass, PassContext, PassOptions, SiteRecord, get_pass, make_options, option,
    parse_pass_specs, register, registry, run_passes,
)
from tests.helpers import linear, save


def test_registry_lists_builtin_passes():
    passes = registry()
    assert "nm" in passes and passes["nm"].kinds == (Kind.LOSSY,) and passes["nm"]().kind is Kind.LOSSY
    assert get_pass("nm") is passes["nm"]
    with pytest.raises(OptionError, match="unknown pass"):
        get_pass("nope")


def test_duplicate_id_is_an_error():
    class Other(Pass):
        id = "nm"
        summary = matches = "x"
        kinds = (Kind.EXACT,)

        def run(self, model, ctx):
            raise AssertionError

    with pytest.raises(ValueError, match="duplicate pass id 'nm'"):
        register(Other)


def test_specs_parse_several_passes():
    passes = parse_pass_specs(" nm:n=1,m=4 ; nm:min_params=0 ;")
    assert [p.spec() for p in passes] == ["nm:n=1", "nm:min_params=0"]
    with pytest.raises(OptionError, match="no pass"):
        parse_pass_specs(" ; ")


@dataclass(frozen=True)
class _Opts(PassOptions):
    ratio: float = option(0.5, "a ratio", min=0.0, max=1.0)
    flag: bool = option(False, "a flag")
    names: tuple[str, ...] = option((), "names")


class _Dummy(Pass):
    id = "dummy-test"
    summary = "test"
    kind = Kind.EXACT
    matches = "nothing"
    Options = _Opts

    def run(self, model, ctx):
        record = self.new_record()
        node = next(iter(model.graph))
        record.sites.append(SiteRecord(site="s", node=node.name, action="changed"))
        return record  # changed a node without tagging it


def test_option_coercion_and_ranges():
    opts = make_options(_Dummy, {"ratio": "0.25", "flag": "yes", "names": "a|b"})
    assert opts == _Opts(0.25, True, ("a", "b"))
    with pytest.raises(OptionError, match="<= 1.0"):
        make_options(_Dummy, {"ratio": "2"})
    with pytest.raises(OptionError, match="expects float"):
        make_options(_Dummy, {"ratio": "x"})


def test_untagged_change_breaks_the_postcondition(tmp_path):
    model = load_model(save(linear(), tmp_path / "m.onnx")).model
    with pytest.raises(PassError, match="without a provenance tag"):
        run_passes(model, [_Dummy()], PassContext())


def test_nm_tags_provenance(tmp_path):
    model = load_model(save(linear(k=128, n=64), tmp_path / "m.onnx")).model
    (record,) = run_passes(model, parse_pass_specs("nm"), PassContext())
    tagged = [n.name for n in all_nodes(model) if "sparsec.pass" in n.metadata_props]
    assert tagged == ["lin"] and "2:4 magnitude" in next(iter(model.graph)).metadata_props["sparsec.reason"]
    assert record.to_dict()["changed"] == 1
