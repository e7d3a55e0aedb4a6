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
    raw = json.loads(CF.read_text())
    reqs = load_requests(str(CF))
    assert len(reqs) == len(raw) == len({r.case_id for r in reqs})  # every record, once
    assert [r.case_id for r in reqs] == [str(row["case_id"]) for row in raw]
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
    assert len(reqs) == len(raw)
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
    assert len(from_config(cfg, str(tmp_path))) == len(json.loads(CF.read_text()))


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


# ----------------------------------------------------------------------------- one stream
def rome_row(case: int, prompt: str, subject: str, new: str, relation: str = "P103") -> dict:
    return {
        "case_id": case,
        "requested_rewrite": {
            "prompt": prompt, "subject": subject, "relation_id": relation,
            "target_new": {"str": new, "id": "Q1"}, "target_true": {"str": "French", "id": "Q150"},
        },
        "paraphrase_prompts": [f"Indeed. {subject} is a native speaker of"],
        "neighborhood_prompts": ["Michel Rocard is a native speaker of"],
        "attribute_prompts": [], "generation_prompts": [f"{subject} was born in"],
    }


def stream_cfg(rome: str, easyedit: str, **top: object) -> dict:
    def node(path: str, schema: str) -> dict:
        return {"path": path, "candidates": [], "url": None, "hf_id": None,
                "schema": schema, "split": "train"}

    return {"name": "counterfact_11k", "limit": None, "on_conflict": "error", **top,
            "sources": {"counterfact": node(rome, "counterfact"),
                        "easyedit": node(easyedit, "easyedit")}}


def test_stream_prefers_first_source_and_keeps_order(tmp_path: Path) -> None:
    """ROME's records first in their order, then EasyEdit's unseen case ids in theirs; a
    shared case id keeps the ROME record (its paraphrases and generation prompts)."""
    rome = write(tmp_path / "cf.json", [
        rome_row(7, "The mother tongue of {} is", "Danielle Darrieux", "English"),
        rome_row(3, "{} is a native speaker of", "Jean Gabin", "Dutch"),
    ])
    ee = [dict(EE_ROW, case_id=1, subject="Montesquieu", prompt="Montesquieu, a native"),
          EE_ROW,  # case 7, the same edit as ROME's case 7
          dict(EE_ROW, case_id=0, subject="Raymond Barre", prompt="Raymond Barre, speaker of")]
    reqs = from_config(stream_cfg(rome, write(tmp_path / "ee.json", ee)), str(tmp_path))
    assert [r.case_id for r in reqs] == ["7", "3", "1", "0"]  # 4 distinct edits of 5 records
    assert [r.source for r in reqs] == ["counterfact", "counterfact", "easyedit", "easyedit"]
    assert reqs[0].generation_prompts == ("Danielle Darrieux was born in",)
    assert reqs[0].relation_id == "P103" and reqs[2].relation_id is None
    cfg = stream_cfg(rome, str(tmp_path / "ee.json"), limit=3)
    assert [r.case_id for r in from_config(cfg, str(tmp_path))] == ["7", "3", "1"]


def test_stream_conflict_names_both_records(tmp_path: Path) -> None:
    """Same subject and relation, another object: an error naming both case ids, the
    subject, the relation and both objects. EasyEdit records have no relation id: they take
    the one ROME's records give their template (here P103, from a template case 7 lacks)."""
    rome = write(tmp_path / "cf.json", [
        rome_row(7, "The mother tongue of {} is", "Danielle Darrieux", "English"),
        rome_row(3, "{} is a native speaker of", "Jean Gabin", "Dutch"),
    ])
    ee = write(tmp_path / "ee.json", [
        dict(EE_ROW, case_id=9, prompt="Danielle Darrieux is a native speaker of",
             target_new="German"),
        dict(EE_ROW, case_id=10, prompt="Danielle Darrieux is a native speaker of"),  # English
    ])
    cfg = stream_cfg(rome, ee)
    message = (r"case_id=7 .*'English'.* and case_id=9 .*'German'.* subject 'Danielle "
               r"Darrieux', relation 'P103', to different objects 'English' and 'German'")
    with pytest.raises(DatasetError, match=message):
        from_config(cfg, str(tmp_path))
    cfg["on_conflict"] = "drop_later"
    assert [r.case_id for r in from_config(cfg, str(tmp_path))] == ["7", "3", "10"]
    cfg["on_conflict"] = "keep"
    assert [r.case_id for r in from_config(cfg, str(tmp_path))] == ["7", "3", "9", "10"]


def test_stream_without_relation_ids_compares_templates(tmp_path: Path) -> None:
    ee = write(tmp_path / "ee.json", [EE_ROW, dict(EE_ROW, case_id=8, target_new="Dutch")])
    cfg = stream_cfg(write(tmp_path / "cf.json", [rome_row(3, "{} sang", "Jean Gabin", "x")]), ee)
    message = r"case_id=7 .* case_id=8 .*relation 'The mother tongue of \{\} is'.*'English' and"
    with pytest.raises(DatasetError, match=message + " 'Dutch'"):
        from_config(cfg, str(tmp_path))


def test_stream_bad_settings(tmp_path: Path) -> None:
    rome = write(tmp_path / "cf.json", [rome_row(7, "{} sang", "Danielle Darrieux", "jazz")])
    ee = write(tmp_path / "ee.json", [EE_ROW])  # case 7 too, but another edit
    with pytest.raises(DatasetError, match=r"case_id=7 names two different edits.*'jazz'.*"
                                           r"'English'"):
        from_config(stream_cfg(rome, ee), str(tmp_path))
    with pytest.raises(DatasetError, match="on_conflict 'drop'; valid options: error, drop_later"):
        from_config(stream_cfg(rome, ee, on_conflict="drop"), str(tmp_path))
    with pytest.raises(DatasetError, match=r"dataset\.sources\.<name>\.path"):
        from_config(stream_cfg(rome, ee, path=rome), str(tmp_path))


def test_stream_config_composes_with_omegaconf(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    root = Path(__file__).resolve().parents[1]
    node = OmegaConf.load(root / "conf" / "dataset" / "counterfact_11k.yaml")
    cfg = OmegaConf.create({"data_root": str(tmp_path), "dataset": node})
    (tmp_path / "counterfact").mkdir()
    write(tmp_path / "counterfact" / "counterfact.json",
          [rome_row(3, "{} is a native speaker of", "Jean Gabin", "Dutch")])
    write(tmp_path / "counterfact" / "counterfact_easyedit_format.json", [EE_ROW] * 2)
    reqs = from_config(cfg.dataset, str(tmp_path / "cache"))
    assert [r.case_id for r in reqs] == ["3", "7"]


@needs_data
def test_counterfact_11k_real_stream(tmp_path: Path) -> None:
    """Every distinct case id of the two files once, ROME's records first (the 1,001
    shared case ids are the same facts in both files); ``drop_later`` leaves no two records
    editing one subject and relation to different objects, and drops only records that
    conflict with an earlier kept one (216 in these files, 12 of them within
    counterfact.json: counted in docs/results.md, derived here from the files)."""
    from kaedit.data.merge import relations

    cfg = stream_cfg(str(CF), str(CF_EE), on_conflict="keep")
    reqs = from_config(cfg, str(tmp_path))
    rome = load_requests(str(CF))
    ids = {str(row["case_id"]) for f in (CF, CF_EE) for row in json.loads(f.read_text())}
    assert len(reqs) == len({r.case_id for r in reqs}) == len(ids)
    assert reqs[: len(rome)] == rome  # dataset=counterfact's stream is the prefix
    assert all(r.source == "easyedit" for r in reqs[len(rome):])
    cfg["on_conflict"] = "drop_later"
    kept = from_config(cfg, str(tmp_path))
    kept_ids = {r.case_id for r in kept}
    assert [r.case_id for r in reqs if r.case_id in kept_ids] == [r.case_id for r in kept]
    by_template = relations(reqs)

    def key(r: EditRequest) -> tuple[str, str]:
        return r.subject, r.relation_id or by_template.get(r.prompt, r.prompt)

    objects: dict[tuple[str, str], set[str]] = {}
    for r in kept:
        objects.setdefault(key(r), set()).add(r.target_new)
    assert all(len(o) == 1 for o in objects.values())  # no conflict left
    dropped = [r for r in reqs if r.case_id not in kept_ids]
    assert dropped  # the real files do conflict
    for r in dropped:  # each conflicts with a record kept before it
        assert key(r) in objects and r.target_new not in objects[key(r)], r.case_id
    cfg["on_conflict"] = "error"
    with pytest.raises(DatasetError, match=r"case_id=1068 .* case_id=5944 .*'Moscow' and "
                                           r"'Lawrence'"):
        from_config(cfg, str(tmp_path))
