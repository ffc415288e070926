"""The bundle contract: what every bundle under ``bundles/`` must satisfy.

The rules follow MONAI's bundle specification and the MONAI model-zoo CI (Project-MONAI/model-zoo, ``ci/``) plus
medssl's own conventions (DESIGN.md): required files, ``metadata.json`` valid against the schema kept in this
package (``meta_schema.json``, written from MONAI's specification because the official schema file cannot be
fetched offline — ``metadata.json`` still names the official URL), a ``name`` equal to the folder name, the version
listed in the changelog, ``required_packages_version`` pinning medssl, configs that parse, the workflow properties
MONAI checks (``ConfigWorkflow.check_properties``), the top-level keys every medssl train config shares, and a
``configs/smoke.json`` override that makes a run tiny.

``verify_bundle(path)`` returns a :class:`BundleReport`; ``tools/check_bundle.py`` prints it for users who write
their own bundles. The test-suite runs it on every bundle.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import medssl

__all__ = [
    "BundleReport",
    "META_SCHEMA_PATH",
    "OFFICIAL_SCHEMA_URL",
    "REQUIRED_FILES",
    "TRAIN_TOP_LEVEL_KEYS",
    "find_bundles",
    "verify_bundle",
    "verify_metadata",
]

META_SCHEMA_PATH = Path(__file__).with_name("meta_schema.json")
OFFICIAL_SCHEMA_URL = (
    "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
)

#: files every medssl bundle ships (model-zoo layout + medssl conventions)
REQUIRED_FILES = (
    "LICENSE",
    "configs/metadata.json",
    "configs/inference.json",
    "configs/logging.conf",
    "docs/README.md",
    "docs/data_license.txt",
    "large_files.yml",
)

#: top-level keys that mean the same thing in every medssl train config (DESIGN.md, issue 2 item 7)
TRAIN_TOP_LEVEL_KEYS = (
    "bundle_root",
    "device",
    "dataset_dir",
    "datalist",
    "epochs",
    "batch_size",
    "num_workers",
    "ckpt_dir",
    "output_dir",
    "amp",
    "resume",
)


@dataclass
class BundleReport:
    """Problems (contract violations) and warnings (worth a look, not failures) of one bundle."""

    bundle: Path
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, where: str, message: str) -> None:
        self.problems.append(f"{self.bundle.name}/{where}: {message}")

    def warn(self, where: str, message: str) -> None:
        self.warnings.append(f"{self.bundle.name}/{where}: {message}")

    def __str__(self) -> str:
        lines = [f"bundle {self.bundle}: {'OK' if self.ok else f'{len(self.problems)} problem(s)'}"]
        lines += [f"  ERROR   {p}" for p in self.problems]
        lines += [f"  WARNING {w}" for w in self.warnings]
        return "\n".join(lines)


def find_bundles(root: str | Path) -> list[Path]:
    """Every folder under ``root`` (``bundles/``) that holds ``configs/``, sorted by name."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and (p / "configs").is_dir())


def _load_json(path: Path, report: BundleReport, where: str):
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        report.add(where, f"not valid JSON: line {e.lineno} column {e.colno}: {e.msg}")
    except OSError as e:
        report.add(where, f"cannot be read: {e}")
    return None


def verify_metadata(meta: dict, report: BundleReport, bundle_name: str | None = None) -> None:
    """Schema, name, changelog and medssl pin checks of a parsed ``metadata.json``."""
    import jsonschema

    schema = json.loads(META_SCHEMA_PATH.read_text())
    validator = jsonschema.Draft7Validator(schema)
    for err in sorted(validator.iter_errors(meta), key=lambda e: list(e.absolute_path)):
        loc = "/".join(str(p) for p in err.absolute_path) or "(top level)"
        report.add("configs/metadata.json", f"schema: {loc}: {err.message}")
    if bundle_name is not None and meta.get("name") not in (None, bundle_name):
        report.add("configs/metadata.json", f"name {meta.get('name')!r} differs from the folder name {bundle_name!r}")
    version = meta.get("version")
    if version is not None and version not in meta.get("changelog", {}):
        report.add("configs/metadata.json", f"version {version} is not listed in the changelog")
    pins = meta.get("required_packages_version", {})
    if isinstance(pins, dict):
        if "medssl" not in pins:
            report.add("configs/metadata.json", "required_packages_version does not pin medssl")
        elif pins["medssl"] != medssl.__version__:
            report.add(
                "configs/metadata.json",
                f"required_packages_version pins medssl {pins['medssl']} but this medssl is {medssl.__version__}",
            )
    if "optional_packages_version" in meta:
        report.warn("configs/metadata.json", "optional_packages_version is renamed required_packages_version in monai 1.6")


def _check_large_files(bundle: Path, report: BundleReport) -> None:
    import yaml

    path = bundle / "large_files.yml"
    if not path.is_file():
        return
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        report.add("large_files.yml", f"not valid YAML: {e}")
        return
    entries = data.get("large_files")
    if not isinstance(entries, list):
        report.add("large_files.yml", "needs a top-level `large_files:` list (it may be empty)")
        return
    for i, entry in enumerate(entries):
        missing = [k for k in ("path", "url", "hash_val", "hash_type") if not isinstance(entry, dict) or k not in entry]
        if missing:
            report.add("large_files.yml", f"entry {i}: missing {missing}")
        elif entry["hash_type"] not in ("md5", "sha1", "sha256", "sha512"):
            report.add("large_files.yml", f"entry {i}: unsupported hash_type {entry['hash_type']!r}")
    listed = {e.get("path") for e in entries if isinstance(e, dict)}
    if not (bundle / "models" / "model.pt").is_file() and "models/model.pt" not in listed:
        report.warn("models/model.pt", "no weights shipped and none listed in large_files.yml (not published yet)")


def _check_configs_parse(bundle: Path, report: BundleReport) -> dict[str, dict]:
    configs = {}
    for cfg in sorted((bundle / "configs").glob("*.json")):
        data = _load_json(cfg, report, f"configs/{cfg.name}")
        if data is not None:
            configs[cfg.name] = data
    return configs


def _check_workflow(bundle: Path, config_files: list[Path], workflow_type: str, report: BundleReport) -> None:
    """The properties MONAI's ``ConfigWorkflow.check_properties`` requires, checked statically.

    MONAI's own check resolves each property through ``hasattr`` and so instantiates datasets, networks and engines
    (it needs the data and the weights); here the config IDs are looked up without instantiating anything. The
    bundle-run tests instantiate everything for real on the demo data.
    """
    from monai.bundle import ConfigWorkflow
    from monai.bundle.properties import InferProperties, TrainProperties

    where = "+".join(f"configs/{p.name}" for p in config_files)
    try:
        workflow = ConfigWorkflow(
            config_file=[str(p) for p in config_files],
            meta_file=str(bundle / "configs" / "metadata.json"),
            workflow_type=workflow_type,
            bundle_root=str(bundle),
        )
        workflow.initialize()
    except Exception as e:  # noqa: BLE001 - any failure here is a contract problem to report, not to raise
        report.add(where, f"{workflow_type} workflow does not initialise: {type(e).__name__}: {e}")
        return
    table = TrainProperties if workflow_type == "train" else InferProperties
    missing = [
        f"{name} ({prop['id'].replace('::', '#')})"
        for name, prop in table.items()
        if prop.get("required") and prop["id"] not in workflow.parser
    ]
    wrong_optional = [
        name for name, prop in table.items() if not prop.get("required") and not workflow._check_optional_id(name, prop)
    ]
    if missing:
        report.add(where, f"{workflow_type} workflow misses required properties {missing}")
    if wrong_optional:
        report.add(where, f"{workflow_type} workflow refers to optional properties under wrong IDs {wrong_optional}")


# boolean parameters that also take other values (resume: a checkpoint path) and parse them where they are used
_NON_BOOLEAN_FLAGS = ("resume",)


def _check_boolean_parameters(configs: dict[str, dict], report: BundleReport) -> None:
    """Every top-level boolean parameter is read through ``medssl.bundle.as_bool`` wherever a config uses it: a
    command-line ``--amp true`` reaches the config as the string "true" (see :mod:`medssl.bundle.params`)."""
    flags = {
        key
        for name, data in configs.items()
        if name != "metadata.json" and isinstance(data, dict)
        for key, value in data.items()
        if isinstance(value, bool) and not key.startswith("_") and key not in _NON_BOOLEAN_FLAGS
    }
    for name, data in configs.items():
        if name == "metadata.json" or not isinstance(data, dict):
            continue
        for where, text in _config_strings(data):
            for key in flags:
                bare = re.sub(r"medssl\.bundle\.as_bool\(@" + re.escape(key) + r"\b", "", text)
                if re.search(r"@" + re.escape(key) + r"(?![\w#])", bare):
                    report.add(
                        f"configs/{name}",
                        f"{where} uses the boolean parameter @{key} directly; read it as "
                        f"$medssl.bundle.as_bool(@{key}, '{key}') so that `--{key} true` on the command line works",
                    )


def _config_strings(node, where: str = ""):
    """(config id, string) for every string value of a parsed config."""
    if isinstance(node, str):
        yield where, node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _config_strings(value, f"{where}#{key}" if where else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _config_strings(value, f"{where}#{i}")


def verify_bundle(path: str | Path, check_workflows: bool = True) -> BundleReport:
    """Check one bundle folder against the contract; never raises for a bad bundle, reports instead."""
    bundle = Path(path).resolve()
    report = BundleReport(bundle)
    if not bundle.is_dir():
        report.add("", "not a directory")
        return report

    for rel in REQUIRED_FILES:
        if not (bundle / rel).is_file():
            report.add(rel, "required file is missing")

    name = bundle.name
    if name != name.lower() or not name.replace("_", "").isalnum():
        report.add("", "bundle names are lower_snake_case (task and data type)")

    configs = _check_configs_parse(bundle, report)
    meta = configs.get("metadata.json")
    if meta is not None:
        verify_metadata(meta, report, bundle_name=name)

    train_files = sorted(n for n in configs if n == "train.json" or (n.startswith("train") and "smoke" not in n))
    if "train.json" in configs:
        train = configs["train.json"]
        missing_keys = [k for k in TRAIN_TOP_LEVEL_KEYS if k not in train]
        if missing_keys:
            report.add("configs/train.json", f"missing top-level keys {missing_keys}")
        for override in ("smoke.json", "multi_gpu_train.json"):
            if override not in configs:
                report.add(f"configs/{override}", "required override file is missing")
        smoke = configs.get("smoke.json", {})
        if smoke is not None and not any(k in smoke for k in ("epochs", "train#trainer#max_epochs", "epoch_length")):
            report.add("configs/smoke.json", "must make the run tiny: set epochs (and sizes)")
    elif not train_files:
        report.warn("configs/", "no train config (inference-only bundle)")

    _check_boolean_parameters(configs, report)

    readme = bundle / "docs" / "README.md"
    if readme.is_file() and "python -m monai.bundle run" not in readme.read_text():
        report.add("docs/README.md", "must state the exact `python -m monai.bundle run` commands")

    _check_large_files(bundle, report)

    if check_workflows and meta is not None:
        if "train.json" in configs:
            _check_workflow(bundle, [bundle / "configs" / "train.json"], "train", report)
        if "inference.json" in configs:
            _check_workflow(bundle, [bundle / "configs" / "inference.json"], "infer", report)
    logging.getLogger(__name__).debug("verified %s: %d problems", bundle, len(report.problems))
    return report
