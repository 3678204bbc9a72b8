"""Prototype description files: the shipped ones parse, cover the organs and the tissue types they must,
fit a CLIP text context; the validator reports every problem; user files override shipped ones;
YAML is parsed safely."""

from __future__ import annotations

import re

import pytest
import yaml

from napari_slpd.proalign.descriptions import (
    PACKAGED_DIR,
    DescriptionError,
    available_descriptions,
    fill_missing_colors,
    load_descriptions,
    parse_descriptions,
    validate_descriptions,
)

ORGANS = ("lung", "breast", "kidney", "colorectal")

# Tissue types each organ file must name (regex over the prototype names, case-insensitive).
REQUIRED = {
    "lung": [r"acinar", r"lepidic", r"papillary", r"micropapillary", r"solid", r"squamous", r"small cell",
             r"alveol", r"bronch", r"cartilage", r"stroma", r"necrosis", r"lympho", r"anthraco", r"haemorrhage",
             r"background", r"artefact"],
    "breast": [r"ductal carcinoma \(NST\)|no special type", r"lobular carcinoma", r"in situ", r"lobul",
               r"adipose", r"stroma", r"necrosis", r"lymphocytes", r"background", r"artefact"],
    "kidney": [r"clear cell", r"papillary", r"chromophobe", r"glomerul", r"tubule", r"medulla", r"adipose",
               r"necrosis", r"stroma|fibrosis", r"lympho", r"background", r"artefact"],
    # the NCT-CRC-HE-100K classes: ADI, BACK, DEB, LYM, MUC, MUS, NORM, STR, TUM
    "colorectal": [r"adenocarcinoma", r"mucinous", r"mucus", r"normal colonic mucosa", r"smooth muscle",
                   r"adipose", r"lymphocytes", r"debris", r"stroma", r"background", r"artefact"],
}

# Features a pathologist expects in the descriptions (regex over all descriptions of the named type).
EXPECTED_TERMS = {
    ("lung", "squamous cell carcinoma"): [r"keratin pearls", r"intercellular bridges"],
    ("lung", "small cell carcinoma"): [r"salt-and-pepper", r"moulding"],
    ("lung", "adenocarcinoma, lepidic pattern"): [r"alveolar walls"],
    ("lung", "adenocarcinoma, micropapillary pattern"): [r"without fibrovascular cores"],
    ("breast", "invasive lobular carcinoma"): [r"single-file", r"targetoid"],
    ("breast", "ductal carcinoma in situ"): [r"myoepithelial", r"comedo"],
    ("kidney", "clear cell renal cell carcinoma"): [r"clear cytoplasm", r"capillar"],
    ("kidney", "chromophobe renal cell carcinoma"): [r"raisinoid", r"perinuclear halos", r"cell borders"],
    ("colorectal", "adenocarcinoma epithelium"): [r"dirty necrosis"],
    ("colorectal", "normal colonic mucosa"): [r"goblet cells", r"crypts"],
}


@pytest.mark.parametrize("organ", ORGANS)
def test_shipped_files_parse_and_cover_the_required_tissue_types(organ):
    desc = load_descriptions(organ)
    assert desc.organ == organ and desc.source.parent == PACKAGED_DIR
    names = " | ".join(desc.names)
    for pattern in REQUIRED[organ]:
        assert re.search(pattern, names, re.IGNORECASE), f"{organ}: no prototype type matching {pattern!r}"
    assert len(desc) >= 10
    assert all(len(p.descriptions) >= 3 for p in desc.prototypes), "several descriptions per type"
    assert len(set(desc.colors)) == len(desc), "every type has its own colour"
    assert all(re.fullmatch(r"#[0-9a-f]{6}", c) for c in desc.colors)
    # every description is distinct within a type
    assert all(len(set(p.descriptions)) == len(p.descriptions) for p in desc.prototypes)


@pytest.mark.parametrize("organ", ORGANS)
def test_shipped_descriptions_fit_the_77_token_clip_context(organ):
    from open_clip.tokenizer import SimpleTokenizer

    tok = SimpleTokenizer()
    for proto in load_descriptions(organ).prototypes:
        for text in proto.descriptions:
            assert len(tok.encode(text)) + 2 <= 77, f"{proto.name}: {text!r} is truncated by a 77-token context"


@pytest.mark.parametrize(("organ", "name"), sorted(EXPECTED_TERMS))
def test_key_histological_features_are_described(organ, name):
    desc = {p.name: p for p in load_descriptions(organ).prototypes}
    text = " ".join(desc[name].descriptions)
    for pattern in EXPECTED_TERMS[(organ, name)]:
        assert re.search(pattern, text, re.IGNORECASE), f"{organ}/{name}: descriptions lack {pattern!r}"


def test_available_lists_the_shipped_organs():
    assert set(ORGANS) <= set(available_descriptions())


def _valid():
    return {"organ": "test", "version": 2, "prototypes": [
        {"name": "tumour", "color": "#FF0000", "descriptions": ["an H&E image of tumour", "  many   cells "]},
        {"name": "stroma", "color": "#00ff00", "descriptions": ["collagen"]},
    ]}


def test_validation_normalizes_a_valid_file():
    desc = validate_descriptions(_valid())
    assert desc.names == ["tumour", "stroma"] and desc.colors == ["#ff0000", "#00ff00"]
    assert desc.version == "2" and desc.prototypes[0].descriptions == ("an H&E image of tumour", "many cells")
    # round trip through YAML
    assert parse_descriptions(desc.to_yaml()) == desc
    assert desc.content_sha256 == parse_descriptions(desc.to_yaml()).content_sha256


def test_validation_lists_every_problem_at_once():
    data = _valid()
    data["colour_scheme"] = "x"
    data["prototypes"][0]["color"] = "red"
    data["prototypes"][1]["name"] = "Tumour"  # duplicate, case-insensitive
    data["prototypes"][1]["descriptions"] = []
    data["prototypes"].append({"name": "necrosis", "color": "#000000", "descriptons": ["typo key"]})
    with pytest.raises(DescriptionError) as info:
        validate_descriptions(data, source="my.yaml")
    msg = str(info.value)
    for part in ("in my.yaml", "colour_scheme", "'color' must be a hex colour", "used twice",
                 "'descriptions' must be a non-empty list", "descriptons"):
        assert part in msg, part


@pytest.mark.parametrize(("text", "match"), [
    ("- just a list", "must be a mapping"),
    ("organ: x\nversion: 1\nprototypes: [{name: a, color: '#000000', descriptions: [t]}]", "at least 2"),
    ("organ: ''\nversion: 1\nprototypes: []", "'organ' must be a non-empty string"),
    ("organ: x\nprototypes: {a: 1}", "'version'"),
    ("organ: [unclosed", "not valid YAML"),
])
def test_malformed_files_give_clear_errors(text, match):
    with pytest.raises(DescriptionError, match=match):
        parse_descriptions(text)


def test_yaml_is_parsed_safely_no_python_objects(tmp_path):
    marker = tmp_path / "pwned"
    evil = (f"organ: x\nversion: 1\nprototypes: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(DescriptionError, match="not valid YAML"):
        parse_descriptions(evil)
    assert not marker.exists()


def test_user_files_override_shipped_ones_and_paths_load(tmp_path, monkeypatch):
    user = tmp_path / "user"
    user.mkdir()
    mine = _valid()
    mine["organ"] = "lung"
    (user / "lung.yaml").write_text(yaml.safe_dump(mine))
    (user / "sarcoma.yml").write_text(yaml.safe_dump({**_valid(), "organ": "sarcoma"}))
    assert load_descriptions("lung").source.parent == PACKAGED_DIR
    assert load_descriptions("lung", extra_dirs=[user]).names == ["tumour", "stroma"]
    monkeypatch.setenv("SLPD_DESCRIPTIONS_DIR", str(user))
    assert load_descriptions("lung").names == ["tumour", "stroma"]
    assert load_descriptions("Sarcoma").organ == "sarcoma"
    assert available_descriptions()["sarcoma"] == user / "sarcoma.yml"
    # by path
    assert load_descriptions(user / "sarcoma.yml").organ == "sarcoma"
    with pytest.raises(DescriptionError, match="does not exist"):
        load_descriptions(tmp_path / "none.yaml")
    with pytest.raises(DescriptionError, match=r"available: .*breast.*slpd describe --organ pancreas"):
        load_descriptions("pancreas")


def test_user_folder_follows_xdg_config_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    folder = tmp_path / "napari-slpd" / "descriptions"
    folder.mkdir(parents=True)
    (folder / "skin.yaml").write_text(yaml.safe_dump({**_valid(), "organ": "skin"}))
    assert load_descriptions("skin").source == folder / "skin.yaml"


def test_fill_missing_colors_uses_unused_palette_colours():
    data = {"prototypes": [{"name": "a", "color": "#1f77b4"}, {"name": "b"}, {"name": "c", "color": "blue"}]}
    fill_missing_colors(data)
    colors = [p["color"] for p in data["prototypes"]]
    assert colors[0] == "#1f77b4" and len(set(colors)) == 3
    assert all(re.fullmatch(r"#[0-9a-f]{6}", c) for c in colors)
