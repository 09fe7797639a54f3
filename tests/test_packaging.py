"""Package metadata, the command line's --version, CUDA support reporting, and the files a
plain clone must carry (test data, design notes, example commands)."""

import ctypes
import os
import pathlib
import re
import sys
import types
import zipfile

import pytest

import rlkern
from rlkern import _info
from rlkern.cli import main

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = pathlib.Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]


def test_license_is_a_pep639_expression_with_its_file():
    assert PROJECT["license"] == "Apache-2.0"
    for name in PROJECT["license-files"]:
        assert (ROOT / name).is_file(), name
    assert "Apache License" in (ROOT / "LICENSE").read_text()[:200]
    # PEP 639: the expression replaces the classifier; both together are rejected.
    assert not [c for c in PROJECT["classifiers"] if c.startswith("License ::")]
    # scikit-build-core writes License-Expression (metadata 2.4) from 0.11 on.
    backend = [v for v in PYPROJECT["build-system"]["requires"] if v.startswith("scikit-build-core")]
    floor = re.fullmatch(r"scikit-build-core>=(\d+)\.(\d+)", backend[0])
    assert floor and (int(floor[1]), int(floor[2])) >= (0, 11)


def test_requires_python_matches_the_classifiers_and_this_interpreter():
    assert PROJECT["requires-python"] == ">=3.10"
    versions = [c.rsplit(" :: ", 1)[1] for c in PROJECT["classifiers"]
                if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)]
    assert versions and all(tuple(map(int, v.split("."))) >= (3, 10) for v in versions)
    assert sys.version_info >= (3, 10)


def test_classifiers():
    classifiers = set(PROJECT["classifiers"])
    for needed in ("Typing :: Typed", "Operating System :: POSIX :: Linux", "Programming Language :: Python :: 3"):
        assert needed in classifiers
    try:  # every classifier is from the trove list, where the list is installed
        import trove_classifiers
    except ImportError:
        return
    assert classifiers <= set(trove_classifiers.classifiers)


def test_no_placeholder_urls():
    urls = PROJECT.get("urls", {})
    for url in urls.values():
        assert not re.search(r"example\.(com|org)|your[-_]?(org|name)|placeholder|TODO", url, re.I), url


def test_extras_for_examples_trl_and_gpu():
    extras = {k: " ".join(v) for k, v in PROJECT["optional-dependencies"].items()}
    assert "gymnasium" in extras["examples"] and "matplotlib" in extras["examples"]
    assert "trl" in extras["trl"]
    assert "triton" in extras["gpu"]


def test_bench_extra_installs_the_trainers_suites_peer():
    """`pip install ".[bench]" && rlkern bench` (the README's main job) runs every suite
    it lists; the trainers suite compares against TRL and has no case without it."""
    assert "trl" in " ".join(PROJECT["optional-dependencies"]["bench"])


def test_typed_marker_ships_with_the_package():
    assert (pathlib.Path(rlkern.__file__).parent / "py.typed").is_file()


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"rlkern {PROJECT['version']}"
    assert rlkern.__version__ == PROJECT["version"]


# ---- CUDA driver support ------------------------------------------------------------------

def _fake_build(monkeypatch, runtime, min_driver):
    cfg = types.SimpleNamespace(CUDA_RUNTIME=runtime, CUDA_MIN_DRIVER=min_driver)
    monkeypatch.setattr(_info, "_build_config", lambda: cfg)


@pytest.mark.parametrize("runtime, min_driver, driver, ok", [
    ("12.8", "525", "12.2", True),    # a CUDA 12 build under an R535 driver
    ("12.8", "525", "13.0", True),    # ... and under an R580 one
    ("13.0", "580", "12.2", False),   # a CUDA 13 build cannot start under R535
    ("13.0", "580", "13.1", True),
    ("12.8", "525", None, None),      # no driver: unknown, not "too old"
])
def test_cuda_support_compares_driver_and_runtime(monkeypatch, runtime, min_driver, driver, ok):
    _fake_build(monkeypatch, runtime, min_driver)
    monkeypatch.setattr(_info, "_cuda_driver_version", lambda: driver)
    got = _info.cuda_support()
    assert got == {"runtime": runtime, "min_driver": min_driver, "driver": driver, "driver_ok": ok}


def test_cpu_only_build_reports_no_cuda_runtime(monkeypatch):
    _fake_build(monkeypatch, "", "")
    monkeypatch.setattr(_info, "_cuda_driver_version", lambda: "12.2")
    assert _info.cuda_support() == {"runtime": None, "min_driver": None, "driver": "12.2", "driver_ok": None}


def test_driver_version_without_a_driver(monkeypatch):
    def no_lib(name, *a, **k):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", no_lib)
    assert _info._cuda_driver_version() is None


def test_driver_version_decoding(monkeypatch):
    class FakeLib:
        @staticmethod
        def cuDriverGetVersion(ptr):
            ctypes.cast(ptr, ctypes.POINTER(ctypes.c_int)).contents.value = 12020
            return 0

    monkeypatch.setattr(ctypes, "CDLL", lambda name, *a, **k: FakeLib())
    assert _info._cuda_driver_version() == "12.2"


def test_info_reports_cuda_support():
    got = rlkern.info()["cuda"]
    assert set(got) == {"runtime", "min_driver", "driver", "driver_ok"}


def test_build_config_template_names_every_field():
    template = (ROOT / "cmake" / "_build_config.py.in").read_text()
    for field in ("CUDA_RUNTIME", "CUDA_MIN_DRIVER"):
        assert f"{field} = " in template
    cmake = (ROOT / "CMakeLists.txt").read_text()
    assert "_build_config.py" in cmake and "install(FILES" in cmake


# ---- what a clone carries -----------------------------------------------------------------

def test_mctx_golden_trees_ship_with_their_attribution():
    data = ROOT / "tests" / "data"
    for name in ("gumbel_muzero_reward_tree.json", "muzero_qtransform_tree.json"):
        assert (data / "mctx" / name).stat().st_size > 1000
    readme = (data / "README.md").read_text()
    assert "Apache License, Version 2.0" in readme and "DeepMind" in readme


def test_design_notes_hold_the_sections_docstrings_cite():
    # returns.py cites the conventions, tests/helpers.py "DESIGN.md section 4" (tolerances).
    design = (ROOT / "docs" / "DESIGN.md").read_text()
    for heading in ("## 2. Conventions", "## 4. Tolerances"):
        assert heading in design
    assert "docs/DESIGN.md" in (ROOT / "README.md").read_text()
    # Every citation in the package and the C++ names the file where it is.
    bare = re.compile(r"(?<![\w/])DESIGN\.md")
    for path in [*(ROOT / "python").rglob("*.py"), *(ROOT / "csrc").rglob("*.*")]:
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            assert not bare.search(line), f"{path.relative_to(ROOT)}:{n} cites DESIGN.md without docs/: {line.strip()}"


EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_command_works_after_pip_install(example):
    doc = example.read_text().split('"""')[1]
    commands = re.findall(r"^\s+(python examples/\S+\.py.*)$", doc, re.M)
    assert commands, f"{example.name}: no command line in the docstring"
    # PYTHONPATH=python would shadow the installed package with the uncompiled source tree.
    assert "PYTHONPATH" not in doc
    readme = (ROOT / "README.md").read_text()
    assert f"python examples/{example.name}" in readme, f"README does not list {example.name}"


# ---- the built wheel (CI points RLKERN_WHEEL at tools/build_wheel.sh's output) -----------

@pytest.mark.skipif(not os.environ.get("RLKERN_WHEEL"), reason="RLKERN_WHEEL not set (CI's wheel step sets it)")
def test_built_wheel_contents_and_tag():
    path = pathlib.Path(os.environ["RLKERN_WHEEL"])
    assert "manylinux_2_28_x86_64" in path.name
    names = zipfile.ZipFile(path).namelist()
    assert "rlkern/py.typed" in names and "rlkern/_build_config.py" in names
    assert any(n.startswith("rlkern/_C.") and n.endswith(".so") for n in names)
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    metadata = zipfile.ZipFile(path).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in metadata
    assert "Requires-Python: >=3.10" in metadata
