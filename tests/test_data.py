"""Dataset loaders: the real files in ../shared/data and every way a source can be wrong."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from kaedit.data import DatasetError, from_config, load_requests, resolve_source
from kaedit.records import EditRequest

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CF = DATA / "counterfact" / "counterfact.json"
CF_EE = DATA / "counterfact" / "counterfact_easyedit_format.json"
ZSRE = DATA / "zsre" / "zsre_mend_eval.json"

needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"real data not found at {DATA}")

EE_ROW = {
    "case_id": 7,
    "prompt": "The mother tongue of Danielle Darrieux is",
    "subject": "Danielle Darrieux",
    "target_new": "English",
    "ground_truth": "French",
    "rephrase_prompt": "Where Danielle Darrieux is from, people speak the language of",
    "locality_prompt": "Michel Rocard is a native speaker of",
    "locality_ground_truth": "French",
}


def write(path: Path, rows: object) -> str:
    path.write_text(json.dumps(rows))
    return str(path)


@needs_data
def test_rome_counterfact_loads_all_records() -> None:
    reqs = load_requests(str(CF))
    assert len(reqs) == 2180
    assert len({r.case_id for r in reqs}) == 2180
    for r in reqs:
        assert isinstance(r, EditRequest) and r.source == "counterfact"
        assert r.prompt.count("{}") == 1 and r.subject and r.target_new and r.target_true
        assert r.relation_id and r.paraphrase_prompts and r.neighborhood_prompts
        assert r.attribute_prompts and r.generation_prompts
    first = reqs[0]
    assert (first.case_id, first.rewrite_prompt) == (
        "3",
        "Autonomous University of Madrid, which is located in",
    )
    assert (first.target_new, first.target_true, first.relation_id) == ("Sweden", "Spain", "P17")


@needs_data
def test_easyedit_counterfact_loads_and_reproduces_prompts() -> None:
    raw = json.loads(CF_EE.read_text())
    reqs = load_requests(str(CF_EE))
    assert len(reqs) == 9852
    for row, r in zip(raw, reqs, strict=True):
        assert r.source == "easyedit" and "{}" in r.prompt
        assert r.rewrite_prompt == row["prompt"]
        assert r.case_id == str(row["case_id"]) and r.target_true == row["ground_truth"]
        assert r.paraphrase_prompts == (row["rephrase_prompt"],)
        assert r.neighborhood_prompts == (row["locality_prompt"],)
        assert r.neighborhood_answer == row["locality_ground_truth"]


@needs_data
def test_zsre_loads_as_memit_reads_it() -> None:
    """kmeng01/memit dsets/zsre.py: the gold answer is the edit, ``loc + "?"`` the probe."""
    raw = json.loads(ZSRE.read_text())
    reqs = load_requests(str(ZSRE))
    assert len(reqs) == len(raw)
    for i, (row, r) in enumerate(zip(raw, reqs, strict=True)):
        assert r.source == "zsre" and r.case_id == str(i)
        assert r.rewrite_prompt == row["src"] and r.target_new == row["answers"][0]
        assert r.target_true == row["answers"][0]
        assert r.paraphrase_prompts == (row["rephrase"],)
        assert r.neighborhood_prompts == (row["loc"] + "?",)
        assert r.neighborhood_target == row["loc_ans"]


@needs_data
def test_zsre_easyedit_reading() -> None:
    """zjunlp/EasyEdit easyeditor/dataset/zsre.py: ``alt`` is the edit, ``loc`` verbatim."""
    raw = json.loads(ZSRE.read_text())[:20]
    reqs = load_requests(str(ZSRE), schema="zsre_easyedit", limit=20)
    assert any(row["alt"] != row["answers"][0] for row in raw)  # the readings differ here
    for row, r in zip(raw, reqs, strict=True):
        assert r.source == "zsre_easyedit"
        assert r.rewrite_prompt == row["src"] and r.target_new == row["alt"]
        assert r.target_true == row["answers"][0]
        assert r.neighborhood_prompts == (row["loc"],)
        assert r.neighborhood_target == row["loc_ans"]


@needs_data
@pytest.mark.parametrize(
    ("path", "schema"), [(CF, "counterfact"), (CF_EE, "easyedit"), (ZSRE, "zsre")]
)
def test_schema_autodetect_and_forced(path: Path, schema: str) -> None:
    assert load_requests(str(path), limit=3)[0].source == schema
    assert load_requests(str(path), schema=schema, limit=3)[0].source == schema
    wrong = "zsre" if schema != "zsre" else "counterfact"
    with pytest.raises(DatasetError, match=f"{path.name}.*{wrong}"):
        load_requests(str(path), schema=wrong)


def test_unknown_schema_lists_options(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="valid options: auto, counterfact, easyedit, zsre"):
        load_requests(write(tmp_path / "a.json", [EE_ROW]), schema="cf")


def test_jsonl_round_trip(tmp_path: Path) -> None:
    rows = [dict(EE_ROW, case_id=i) for i in range(3)]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + json.dumps(rows[2]))
    reqs = load_requests(str(path))
    assert [r.case_id for r in reqs] == ["0", "1", "2"]
    assert all(r.rewrite_prompt == EE_ROW["prompt"] for r in reqs)
    assert reqs[0].prompt == "The mother tongue of {} is"


def test_wrapped_json_and_loose_fields(tmp_path: Path) -> None:
    row = dict(EE_ROW, target_new=["English"], rephrase_prompt=["a Danielle Darrieux", "b"])
    row.pop("case_id")
    (req,) = load_requests(write(tmp_path / "w.json", {"data": [row]}))
    assert (req.case_id, req.target_new, req.paraphrase_prompts) == (
        "0",
        "English",
        ("a Danielle Darrieux", "b"),
    )


def test_braces_in_sentence_are_escaped(tmp_path: Path) -> None:
    row = dict(EE_ROW, prompt="In {braces} Danielle Darrieux speaks")
    (req,) = load_requests(write(tmp_path / "b.json", [row]))
    assert req.rewrite_prompt == row["prompt"]


def test_malformed_json_names_file_and_position(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"prompt": "x",\n  oops}\n]')
    with pytest.raises(DatasetError, match=r"bad\.json.*line 3, column 3"):
        load_requests(str(path))
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(EE_ROW) + "\n{not json\n")
    with pytest.raises(DatasetError, match=r"bad\.jsonl.*line 2"):
        load_requests(str(path))


@pytest.mark.parametrize(
    ("name", "content"), [("empty.json", ""), ("empty.jsonl", "\n\n"), ("list.json", "[]")]
)
def test_empty_sources(tmp_path: Path, name: str, content: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DatasetError, match=f"{name} contains no records"):
        load_requests(str(path))


def test_row_missing_subject_names_record(tmp_path: Path) -> None:
    rows = [EE_ROW, {k: v for k, v in dict(EE_ROW, case_id=42).items() if k != "subject"}]
    with pytest.raises(DatasetError, match=r"m\.json: record 1 \(case_id=42\).*'subject'"):
        load_requests(write(tmp_path / "m.json", rows))


def test_subject_not_in_prompt_names_record(tmp_path: Path) -> None:
    rows = [EE_ROW, EE_ROW, dict(EE_ROW, case_id=9, subject="Nobody")]
    with pytest.raises(DatasetError, match=r"record 2 \(case_id=9\).*'Nobody' does not occur"):
        load_requests(write(tmp_path / "s.json", rows))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"target_new": 3}, "'target_new' must be a string, got int"),
        ({"target_new": "  "}, "'target_new' is an empty string"),
        ({"subject": ["Danielle Darrieux"]}, "'subject' must be a string, got list"),
    ],
)
def test_bad_field_values(tmp_path: Path, change: dict, message: str) -> None:
    with pytest.raises(DatasetError, match=rf"record 0 \(case_id=7\).*{message}"):
        load_requests(write(tmp_path / "v.json", [dict(EE_ROW, **change)]))


@needs_data
def test_rome_template_needs_one_placeholder(tmp_path: Path) -> None:
    row = json.loads(CF.read_text())[0]
    row["requested_rewrite"]["prompt"] = "Autonomous University of Madrid is in"
    with pytest.raises(DatasetError, match=r"record 0 \(case_id=3\).*exactly one"):
        load_requests(write(tmp_path / "r.json", [row]))


@needs_data
def test_limit() -> None:
    assert [r.case_id for r in load_requests(str(ZSRE), limit=5)] == ["0", "1", "2", "3", "4"]
    assert len(load_requests(str(CF), limit=0)) == 0
    with pytest.raises(DatasetError, match="limit"):
        load_requests(str(CF), limit=-1)


@needs_data
def test_from_config_path_and_candidates(tmp_path: Path) -> None:
    cfg = {
        "name": "zsre",
        "schema": "auto",
        "path": str(ZSRE),
        "candidates": [],
        "url": None,
        "hf_id": None,
        "split": "train",
        "limit": 4,
    }
    assert len(from_config(cfg, str(tmp_path))) == 4
    cfg.update(path=None, candidates=[str(tmp_path / "missing.json"), str(CF)], limit=None)
    assert len(from_config(cfg, str(tmp_path))) == 2180


def test_from_config_composes_with_omegaconf(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    root = Path(__file__).resolve().parents[1]
    node = OmegaConf.load(root / "conf" / "dataset" / "counterfact_easyedit.yaml")
    cfg = OmegaConf.create({"data_root": str(tmp_path), "dataset": node})
    (tmp_path / "counterfact").mkdir()
    write(tmp_path / "counterfact" / "counterfact_easyedit_format.json", [EE_ROW] * 3)
    assert len(from_config(cfg.dataset, str(tmp_path / "cache"))) == 3


def test_nonexistent_path_is_named(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope" / "counterfact.json")
    with pytest.raises(DatasetError, match=r"dataset file not found: .*nope/counterfact\.json"):
        resolve_source(missing, [], None, None, str(tmp_path))
    with pytest.raises(DatasetError, match=re.escape("nope/counterfact.json")):
        load_requests(missing)


def test_unreachable_url_is_named(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"could not reach.*127\.0\.0\.1:9.*dataset\.path="):
        resolve_source(
            None, [str(tmp_path / "absent.json")], "http://127.0.0.1:9/x.json", None, str(tmp_path)
        )
    with pytest.raises(DatasetError, match="could not reach"):
        from_config({"path": "http://127.0.0.1:9/x.json"}, str(tmp_path))
    assert [p.name for p in tmp_path.iterdir()] == []  # no partial download left behind


def test_url_is_downloaded_once_into_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import io
    import urllib.request

    calls = []

    def fake_urlopen(url: str, timeout: float) -> io.BytesIO:
        calls.append((url, timeout))
        return io.BytesIO(json.dumps([EE_ROW]).encode())

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    url = "https://example.org/dsets/cf.json"
    first = resolve_source(None, [], url, None, str(tmp_path))
    assert resolve_source(None, [], url, None, str(tmp_path)) == first
    assert len(calls) == 1 and calls[0][1] <= 10 and first.endswith("-cf.json")
    assert load_requests(first)[0].case_id == "7"
    assert [p.name for p in tmp_path.iterdir()] == [Path(first).name]


def test_hub_id_is_passed_through(tmp_path: Path) -> None:
    assert resolve_source("azhx/counterfact", [], None, None, str(tmp_path)) == "azhx/counterfact"
    assert resolve_source(None, [], None, "azhx/counterfact", str(tmp_path)) == "azhx/counterfact"
