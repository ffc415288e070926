"""The demo report corpus: deterministic synthetic text for MedCoSS's 1D path (masked language modelling, report and
sentence classification). Written by :func:`write_report_corpus` under ``DIR/reports/``; no file is read, nothing
is downloaded.

Two parts:

- **Chest X-ray reports** (``reports/reports.jsonl``, ``datalist_reports.json``): one radiology report per
  learnability chest X-ray (:mod:`medssl.data.learnability`, ``XR``), same class, same section, same index, so
  ``paired_image`` names the image the report goes with (``learn/xr/xr_NNNN.png``, present when the learnability
  set is built with the same per-class counts). Classes ``normal`` 0 / ``nodules`` 1 / ``effusion`` 2
  (:data:`REPORT_CLASSES`, the learnability set's XR labels), alternating within each section: 240 / 50 / 50 per
  class in training / validation / test. A report is one line: examination, indication, comparison, findings,
  impression. The indication, technique, heart, bone and comparison sentences are drawn from the same lists for
  every class, and the indications name the other classes' findings ("follow-up of a pulmonary nodule",
  "evaluate for effusion") regardless of the class; normal reports negate findings ("no pleural effusion", "no
  suspicious nodule"), abnormal ones negate the other finding and hedge ("cannot be excluded", "may represent");
  each finding has phrasings without its keyword ("rounded opacities", "fluid layering ... meniscus"). No single
  word marks one class (the tests check it); a linear model on word counts separates them well.
- **Abstract sentences** (``reports/sentences.jsonl``, ``datalist_sentences.json``): PubMed-20k-style sentence
  roles ``background`` 0 / ``objective`` 1 / ``methods`` 2 / ``results`` 3 / ``conclusions`` 4
  (:data:`SENTENCE_CLASSES`) from synthetic imaging-study abstracts: each abstract has two sentences of each role in
  that order (``abstract``, ``position``), on one topic (disease, imaging test, population, index test) shared by
  all ten, so topic words do not give the role away; 150 / 30 / 30 abstracts (1500 / 300 / 300 sentences, balanced).

Records (one JSON object a line): ``id``, ``text``, ``label``, ``class_name``, ``split`` (``training`` /
``validation`` / ``test``), plus ``modality`` ``"XR"`` and ``paired_image`` for reports, ``abstract`` and
``position`` for sentences. The datalists have medssl's sections ``training`` / ``validation`` / ``test`` with items
``{"text", "label", "modality": "TEXT", "dim": 1, "id", ...}`` and the top-level ``classes``, ``builder``,
``numTraining`` / ``numValidation`` / ``numTest``. ``"TEXT"`` is not (yet) one of
:data:`medssl.data.datalist.MODALITIES`: these datalists are read as text, not with the image loaders.

Determinism: report ``i`` draws from ``numpy.random.default_rng(SeedSequence([seed, 31, i]))``, abstract ``j`` from
``SeedSequence([seed, 32, j])``; JSON is written with fixed key order and ``\\n`` line ends, so the same seed gives
byte-identical files. Only numpy and the standard library are used; writing takes well under a second.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .learnability import LABEL_OFFSETS, LEARN_CLASSES, PER_CLASS_2D, SECTIONS, _plan

__all__ = [
    "REPORTS_VERSION",
    "REPORT_CLASSES",
    "SENTENCE_CLASSES",
    "ABSTRACTS_PER_SPLIT",
    "REPORT_DATALISTS",
    "make_report",
    "make_abstract",
    "report_records",
    "sentence_records",
    "write_report_corpus",
    "report_corpus_is_current",
    "REPORT_FILES",
]

#: Bump when the text of the corpus changes.
REPORTS_VERSION = 1
#: Report classes = the learnability set's chest X-ray classes (labels 0-2 there and here).
REPORT_CLASSES: tuple[str, ...] = tuple(LEARN_CLASSES["XR"])
SENTENCE_CLASSES: tuple[str, ...] = ("background", "objective", "methods", "results", "conclusions")
#: Abstracts (10 sentences each, 2 per role) in training / validation / test.
ABSTRACTS_PER_SPLIT = (150, 30, 30)
REPORT_DATALISTS = {
    "datalist_reports.json": "chest X-ray reports, classes normal / nodules / effusion",
    "datalist_sentences.json": "abstract sentences, roles background / objective / methods / results / conclusions",
}
#: What :func:`write_report_corpus` writes under the dataset directory (a folder and two datalists).
REPORT_FILES = ("reports", "datalist_reports.json", "datalist_sentences.json")
_GROUP_REPORTS, _GROUP_ABSTRACTS = 31, 32  # random-stream groups, disjoint from the demo (1-9) and learn (21-25) ones
assert LABEL_OFFSETS["XR"] == 0 and REPORT_CLASSES == ("normal", "nodules", "effusion")


def _rng(seed: int, group: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), group, index]))


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _fill(rng: np.random.Generator, template: str, slots: dict[str, Sequence[str]]) -> str:
    """``template`` with each ``{name}`` replaced by a random choice of ``slots[name]`` (in order of appearance)."""
    out, rest = [], template
    while "{" in rest:
        head, _, tail = rest.partition("{")
        name, _, rest = tail.partition("}")
        out.append(head)
        out.append(_pick(rng, slots[name]))
    out.append(rest)
    return "".join(out)


def _sentence(text: str) -> str:
    text = text.strip()
    text = text[0].upper() + text[1:]
    return text if text.endswith((".", "?", "!")) else text + "."


# --------------------------------------------------------------------------------------------------
# chest X-ray reports
# --------------------------------------------------------------------------------------------------
_SLOTS = {
    "side": ("left", "right"),  # make_report fixes side / other / sides per report
    "size": ("small", "moderate", "large", "trace"),
    "few": ("multiple", "several", "a few", "two", "three", "numerous", "scattered"),
    "round": ("rounded", "round", "well-circumscribed", "nodular", "discrete", "spherical"),
    "opac": ("opacities", "densities", "nodules", "lesions", "shadows"),
    "where": (
        "in both lungs",
        "in both mid and lower zones",
        "scattered throughout both lungs",
        "in the upper zones bilaterally",
        "projecting over both lung fields",
        "in the right and left lower lobes",
    ),
    "mm": tuple(str(n) for n in range(4, 26)),
    "zone": ("lower zone", "base", "lung base", "costophrenic recess"),
    "months": ("3", "6", "12", "18", "24"),
}
_EXAMS = (
    "Chest radiograph, PA and lateral views",
    "Portable AP chest radiograph",
    "Chest X-ray, single frontal view",
    "PA chest radiograph",
    "Chest radiograph, erect PA",
    "Supine AP chest film",
)
# drawn for every class alike: some name the other classes' findings
_INDICATIONS = (
    "cough for two weeks",
    "shortness of breath",
    "fever and productive cough",
    "preoperative assessment",
    "chest pain",
    "history of smoking",
    "unintentional weight loss",
    "follow-up of a pulmonary nodule seen on prior imaging",
    "evaluate for pleural effusion",
    "known malignancy, staging",
    "dyspnoea on exertion",
    "rule out pneumonia",
    "reduced breath sounds at the left base",
    "reduced breath sounds at the right base",
    "known heart failure",
    "haemoptysis",
)
_COMPARISONS = (
    "None",
    "None available",
    "Prior radiograph from {months} months ago",
    "Chest CT of {months} months ago",
)
_TECHNIQUE = (
    "Lung volumes are low.",
    "The patient is slightly rotated.",
    "Lung volumes are normal.",
    "Satisfactory inspiration.",
    "The film is mildly underpenetrated.",
    "",
    "",
)
_HEART = (
    "The cardiomediastinal silhouette is within normal limits.",
    "Heart size is normal.",
    "The heart is mildly enlarged.",
    "Mild cardiomegaly, unchanged.",
    "Normal cardiac and mediastinal contours.",
    "The aorta is mildly unfolded.",
)
_BONES = (
    "No acute osseous abnormality.",
    "Degenerative changes of the thoracic spine.",
    "The visualised bones are unremarkable.",
    "Old healed fracture of a left rib.",
    "",
)
_NO_PTX = ("No pneumothorax.", "There is no pneumothorax.", "")
_NO_EFFUSION = (
    "No pleural effusion.",
    "No effusion.",
    "The costophrenic angles are sharp.",
    "No pleural fluid.",
    "Both costophrenic angles are clear.",
    "There is no effusion or pleural thickening.",
)
_NO_NODULE = (
    "No suspicious pulmonary nodule.",
    "No focal nodule or mass.",
    "No nodules are seen.",
    "No discrete mass lesion.",
    "There is no evidence of a nodule.",
)
_CLEAR = (
    "The lungs are clear.",
    "Both lungs are clear.",
    "The lungs are well expanded and clear.",
    "No focal consolidation.",
    "No focal airspace opacity.",
    "Lung fields are unremarkable.",
)
_NORMAL_HEDGES = (
    "A tiny density at the {side} base likely represents a nipple shadow.",
    "Subtle linear opacity at the {side} base, likely atelectasis.",
    "A small calcified granuloma in the {side} upper zone, unchanged.",
    "Minor blunting of the {side} costophrenic angle is likely due to pleural thickening.",
    "",
    "",
    "",
)
_NORMAL_IMPRESSIONS = (
    "No acute cardiopulmonary abnormality.",
    "Normal chest radiograph.",
    "No active disease.",
    "Clear lungs; no effusion or nodule.",
    "No radiographic evidence of pneumonia, effusion or mass.",
    "Unremarkable study.",
    "No acute findings.",
)
_NODULE_FINDINGS = (
    "{few} {round} {opac} {where}, the largest measuring {mm} mm.",
    "There are {few} {round} {opac} {where}, up to {mm} mm.",
    "{few} {round} {opac} are noted {where}.",
    "Bilateral {round} {opac}, measuring up to {mm} mm.",
    "{few} small round soft-tissue densities {where}.",
    "Several {round} masses {where}, the largest {mm} mm.",
)
_NODULE_EXTRA = (
    "Some of the lesions may be calcified.",
    "The margins are smooth.",
    "The margins are ill-defined.",
    "The lungs are otherwise clear.",
    "No cavitation is seen.",
    "",
)
_NODULE_IMPRESSIONS = (
    "Multiple pulmonary nodules; chest CT is recommended.",
    "Findings are concerning for metastatic disease.",
    "Bilateral rounded opacities; differential includes metastases and granulomatous disease.",
    "Multiple lung lesions, new since the prior study.",
    "Consider CT for further characterisation of the opacities.",
    "Nodular opacities in both lungs, likely metastases.",
    "Multiple round densities; infection cannot be excluded.",
)
_EFFUSION_FINDINGS = (
    "{size} {sides} pleural effusion.",
    "Blunting of the {side} costophrenic angle with a meniscus.",
    "Fluid layering in the {side} pleural space.",
    "Homogeneous opacity at the {side} {zone} with a lateral meniscus, in keeping with pleural fluid.",
    "Opacification of the {side} {zone} obscuring the hemidiaphragm, with a meniscus sign.",
    "There is a {size} {side} effusion.",
    "Basal opacity on the {side} with a concave upper margin, consistent with fluid.",
)
_EFFUSION_EXTRA = (
    "Adjacent atelectasis is likely.",
    "Underlying consolidation cannot be excluded.",
    "The {other} lung is clear.",
    "No mediastinal shift.",
    "",
)
_EFFUSION_IMPRESSIONS = (
    "{size} {sides} pleural effusion.",
    "Pleural fluid on the {side}.",
    "Findings consistent with effusion; underlying consolidation not excluded.",
    "{side} basal fluid collection, may represent effusion or thickening.",
    "Blunted {side} costophrenic angle, in keeping with fluid.",
    "{side} pleural fluid; ultrasound may be helpful.",
)

#: Fractions of reports (any class) with an equivocal reading, and of abnormal reports with a subtle finding.
_P_EQUIVOCAL, _P_SUBTLE = 0.06, 0.1
_EQUIVOCAL_FINDINGS = (
    "Subtle opacity at the {side} base, which may represent atelectasis, a small effusion or an overlying nodule.",
    "Ill-defined density at the {side} {zone}; a small nodule or a little pleural fluid cannot be excluded.",
    "Limited study due to rotation and low lung volumes; the {side} base is not well assessed.",
    "Possible subtle abnormality at the {side} base, of uncertain significance.",
)
_NO_PTX_OR_MASS = ("No pneumothorax.", "No large mass.", "The {other} lung is clear.")
_EQUIVOCAL_IMPRESSIONS = (
    "Equivocal findings at the {side} base; clinical correlation and follow-up are recommended.",
    "Indeterminate {side} basal opacity; consider repeat radiograph or CT.",
    "No definite acute abnormality; a subtle finding at the {side} base cannot be excluded.",
)
_SUBTLE_FINDINGS = {
    1: (
        "A tiny density at the {side} base may represent a small nodule rather than a nipple shadow.",
        "A small {mm} mm density in the {side} upper zone, possibly a granuloma, not seen previously.",
    ),
    2: (
        "Minor blunting of the {side} costophrenic angle, likely a trace of fluid.",
        "Subtle linear opacity at the {side} base with slight blunting, possibly a small amount of fluid.",
    ),
}
_SUBTLE_IMPRESSIONS = {
    1: ("Possible small {side} lung nodule; follow-up is advised.", "Probable new small density; consider CT."),
    2: ("Probable trace {side} fluid.", "Minimal {side} basal blunting, likely trace fluid."),
}


def make_report(rng: np.random.Generator, class_index: int) -> str:
    """One chest X-ray report (a single line) of class ``class_index`` (0 normal, 1 nodules, 2 effusion)."""
    side = _pick(rng, _SLOTS["side"])  # one side per report, used by every sentence that names one
    slots = dict(
        _SLOTS,
        side=(side,),
        other=("right" if side == "left" else "left",),
        sides=(side if rng.random() < 0.75 else "bilateral",),
    )
    f = lambda template: _fill(rng, template, slots)  # noqa: E731
    findings: list[str] = [_pick(rng, _TECHNIQUE)]
    style = rng.random()
    if class_index not in (0, 1, 2):
        raise ValueError(f"make_report: class_index must be 0, 1 or 2, got {class_index!r}")
    if style < _P_EQUIVOCAL:  # the same pool for every class: a reader's equivocal call, not decidable from text
        lungs = [f(_pick(rng, _EQUIVOCAL_FINDINGS))]
        if rng.random() < 0.5:
            lungs.append(_pick(rng, _NO_PTX_OR_MASS))
        impression = f(_pick(rng, _EQUIVOCAL_IMPRESSIONS))
    elif class_index > 0 and style < _P_EQUIVOCAL + _P_SUBTLE:  # a subtle finding worded like a normal hedge
        lungs = [f(_pick(rng, _SUBTLE_FINDINGS[class_index])), f(_pick(rng, _CLEAR))]
        impression = f(_pick(rng, _SUBTLE_IMPRESSIONS[class_index]))
    elif class_index == 0:
        lungs = [f(_pick(rng, _CLEAR))]
        if rng.random() < 0.7:
            lungs.append(_pick(rng, _NO_EFFUSION))
        if rng.random() < 0.5:
            lungs.append(_pick(rng, _NO_NODULE))
        lungs.append(f(_pick(rng, _NORMAL_HEDGES)))
        impression = _pick(rng, _NORMAL_IMPRESSIONS)
    elif class_index == 1:
        lungs = [f(_pick(rng, _NODULE_FINDINGS)), f(_pick(rng, _NODULE_EXTRA))]
        if rng.random() < 0.7:
            lungs.append(_pick(rng, _NO_EFFUSION))
        impression = f(_pick(rng, _NODULE_IMPRESSIONS))
    elif class_index == 2:
        lungs = [f(_pick(rng, _EFFUSION_FINDINGS)), f(_pick(rng, _EFFUSION_EXTRA))]
        if rng.random() < 0.5:
            lungs.append(_pick(rng, _NO_NODULE))
        impression = f(_pick(rng, _EFFUSION_IMPRESSIONS))
    order = rng.permutation(len(lungs) - 1) + 1  # the main lung sentence first, the others in random order
    findings += [lungs[0]] + [lungs[i] for i in order]
    findings += [_pick(rng, _HEART), _pick(rng, _NO_PTX), _pick(rng, _BONES)]
    findings_text = " ".join(_sentence(s) for s in findings if s)
    parts = [
        f"EXAMINATION: {_pick(rng, _EXAMS)}.",
        f"INDICATION: {_sentence(_pick(rng, _INDICATIONS))}",
        f"COMPARISON: {_sentence(f(_pick(rng, _COMPARISONS)))}",
        f"FINDINGS: {findings_text}",
        f"IMPRESSION: {_sentence(impression)}",
    ]
    return " ".join(parts)


def report_records(seed: int = 0, per_class: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """The chest X-ray report records, in the learnability set's XR order (see the module docstring)."""
    split = tuple(int(n) for n in (per_class if per_class is not None else PER_CLASS_2D))
    if len(split) != 3 or min(split) < 1:
        raise ValueError(f"report_records: per_class {split} must be 3 positive counts (training, validation, test)")
    plan = _plan("XR", split)
    digits = max(3, len(str(len(plan) - 1)))  # the learnability set's file names
    records = []
    for section, index, class_index in plan:
        name = f"xr_{index:0{digits}d}"
        records.append(
            {
                "id": f"report_{index:0{digits}d}",
                "text": make_report(_rng(seed, _GROUP_REPORTS, index), class_index),
                "label": LABEL_OFFSETS["XR"] + class_index,
                "class_name": REPORT_CLASSES[class_index],
                "split": section,
                "modality": "XR",
                "paired_image": f"learn/xr/{name}.png",
            }
        )
    return records


# --------------------------------------------------------------------------------------------------
# abstract sentences (PubMed-20k-style roles)
# --------------------------------------------------------------------------------------------------
# (disease, imaging test, population, index test)
_TOPICS = (
    ("pulmonary nodules", "low-dose CT", "current and former smokers", "a deep learning detector"),
    ("pleural effusion", "chest ultrasound", "intensive care patients", "point-of-care ultrasound"),
    ("community-acquired pneumonia", "chest radiography", "children", "a clinical decision rule"),
    ("liver metastases", "contrast-enhanced MRI", "patients with colorectal cancer", "diffusion-weighted imaging"),
    ("COVID-19 pneumonia", "chest CT", "hospitalised adults", "a severity score"),
    ("multiple sclerosis", "brain MRI", "patients with a first demyelinating event", "a central vein sign"),
    ("breast cancer", "digital mammography", "women attending screening", "tomosynthesis"),
    ("diabetic retinopathy", "fundus photography", "adults with type 2 diabetes", "an automated grading system"),
    ("pulmonary embolism", "CT pulmonary angiography", "emergency department patients", "a D-dimer threshold"),
    ("prostate cancer", "multiparametric MRI", "men with raised PSA", "a structured reporting scheme"),
    ("hepatic steatosis", "ultrasound elastography", "patients with obesity", "controlled attenuation parameter"),
    ("lung cancer", "PET-CT", "patients with suspected recurrence", "quantitative radiomics"),
)
_ROLE_SLOTS = {
    "common": ("common", "major", "leading", "frequent", "serious"),
    "burden": ("morbidity", "mortality", "hospital admission", "disability", "health-care costs"),
    "where": ("worldwide", "in adults", "in older patients", "in many countries", "in clinical practice"),
    "eval": ("evaluate", "assess", "compare", "determine", "investigate", "validate"),
    "quality": ("diagnostic accuracy", "reliability", "reproducibility", "clinical value", "cost-effectiveness"),
    "aspect": ("diagnostic performance", "accuracy", "agreement", "prognostic value", "added value"),
    "design": ("retrospectively", "prospectively", "consecutively"),
    "enrol": ("enrolled", "included", "reviewed", "recruited", "analysed"),
    "n": tuple(str(n) for n in (48, 62, 85, 112, 150, 204, 236, 318, 402, 512, 640, 1024)),
    "year1": ("2012", "2014", "2015", "2016", "2017"),
    "year2": ("2019", "2020", "2021", "2022"),
    "readers": ("two radiologists", "three readers", "two experienced observers", "a panel of radiologists"),
    "blind": ("clinical data", "the reference standard", "the final diagnosis", "each other's reads"),
    "stat": ("logistic regression", "receiver operating characteristic analysis", "the kappa statistic",
             "a mixed-effects model", "Cox regression", "the McNemar test"),
    "reference": ("histopathology", "follow-up imaging", "expert consensus", "clinical follow-up of 12 months"),
    "metric": ("Sensitivity", "Specificity", "Accuracy", "The positive predictive value",
               "The negative predictive value"),
    "pct": tuple(f"{v:.1f}" for v in (61.2, 68.4, 72.5, 77.9, 81.3, 84.6, 88.0, 90.7, 93.2, 95.8)),
    "lo": ("55.1", "60.3", "66.8", "70.2", "74.9"),
    "hi": ("89.4", "92.1", "94.6", "96.3", "98.0"),
    "p": ("0.001", "0.003", "0.01", "0.02", "0.04", "0.12", "0.34", "0.58"),
    "odds": ("1.4", "1.9", "2.3", "3.1", "4.7"),
    "kappa": ("0.61", "0.68", "0.74", "0.82", "0.89"),
    "agree": ("good", "excellent", "moderate", "substantial"),
    "auc": ("0.74", "0.79", "0.83", "0.87", "0.91", "0.94"),
    "age": ("48", "54", "59", "63", "67", "71"),
    "useful": ("useful", "reliable", "promising", "valuable", "accurate"),
    "may": ("may", "could", "might", "can"),
    "improve": ("improve", "support", "streamline", "standardise"),
    "further": ("prospective", "multicentre", "larger", "randomised"),
    "confirm": ("confirm", "validate", "extend", "generalise"),
}
# templates may also use {disease}, {test}, {population}, {index} (the abstract's topic)
_ROLE_TEMPLATES: dict[str, tuple[str, ...]] = {
    "background": (
        "{disease} is a {common} cause of {burden} {where}.",
        "{test} is widely used to detect {disease}, but its {quality} remains uncertain.",
        "Early detection of {disease} {may} reduce {burden}.",
        "Little is known about the {aspect} of {index} in {population}.",
        "Previous studies of {test} in {population} have reported conflicting results.",
        "The {quality} of {test} for {disease} varies between readers and centres.",
        "Current guidelines recommend {test} for {population}, although evidence is limited.",
        "{index} {may} {improve} the detection of {disease}.",  # also a conclusion
    ),
    "objective": (
        "We aimed to {eval} the {aspect} of {index} for {disease} in {population}.",
        "The purpose of this study was to {eval} whether {index} {may} {improve} the diagnosis of {disease}.",
        "This study investigated the {aspect} of {test} in {population}.",
        "To {eval} the {aspect} of {index} compared with {test} for {disease}.",
        "Our objective was to {eval} {index} in {population} with suspected {disease}.",
        "We sought to {eval} the {quality} of {test} for {disease}.",
        "We compared {index} with {test} in {population}.",  # also a method
    ),
    "methods": (
        "We {design} {enrol} {n} {population} who underwent {test} between {year1} and {year2}.",
        "{readers}, blinded to {blind}, independently reviewed all images.",
        "{aspect} was assessed using {stat}.",
        "The reference standard was {reference}.",
        "Images were acquired with a standardised protocol and analysed with {index}.",
        "Patients were randomly assigned to {test} alone or {test} with {index}.",
        "Data on {burden} were collected from the medical records.",
        "We compared {index} with {test} in {population}.",  # also an objective
        "A total of {n} {population} were included.",  # also a result
    ),
    "results": (
        "{metric} of {index} was {pct}% (95% CI {lo}-{hi}).",
        "A total of {n} {population} (mean age, {age} years) were analysed.",
        "{index} was significantly associated with {disease} (odds ratio {odds}; p = {p}).",
        "Interobserver agreement was {agree} (kappa = {kappa}).",
        "The area under the curve was {auc} for {index} and {auc} for {test} (p = {p}).",
        "No significant difference in {aspect} was found between the groups (p = {p}).",
        "{disease} was confirmed in {n} patients.",
        "A total of {n} {population} were included.",  # also a method
    ),
    "conclusions": (
        "{index} is a {useful} tool for the diagnosis of {disease} in {population}.",
        "These findings suggest that {index} {may} {improve} the management of {disease}.",
        "Further {further} studies are needed to {confirm} these results.",
        "In conclusion, {test} with {index} showed {agree} {aspect} for {disease}.",
        "{index} {may} be considered as an adjunct to {test} in {population}.",
        "Our results support the use of {index} for {disease} in routine practice.",
        "{index} {may} {improve} the detection of {disease}.",  # also a background sentence
    ),
}


def make_abstract(rng: np.random.Generator, per_role: int = 2) -> list[tuple[int, str]]:
    """``(role index, sentence)`` of one synthetic abstract: ``per_role`` sentences of each role, in role order."""
    disease, test, population, index = _TOPICS[int(rng.integers(len(_TOPICS)))]
    slots = dict(_ROLE_SLOTS, disease=(disease,), test=(test,), population=(population,), index=(index,))
    out = []
    for role, name in enumerate(SENTENCE_CLASSES):
        templates = _ROLE_TEMPLATES[name]
        for t in sorted(rng.choice(len(templates), size=per_role, replace=False).tolist()):
            out.append((role, _sentence(_fill(rng, templates[t], slots))))
    return out


def sentence_records(seed: int = 0, abstracts: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """The abstract sentence records (see the module docstring); ``abstracts`` per section, default 150 / 30 / 30."""
    split = tuple(int(n) for n in (abstracts if abstracts is not None else ABSTRACTS_PER_SPLIT))
    if len(split) != 3 or min(split) < 1:
        raise ValueError(f"sentence_records: abstracts {split} must be 3 positive counts (training, validation, test)")
    records, number = [], 0
    for section, count in zip(SECTIONS, split):
        for _ in range(count):
            for position, (role, text) in enumerate(make_abstract(_rng(seed, _GROUP_ABSTRACTS, number))):
                records.append(
                    {
                        "id": f"abstract_{number:04d}_{position:02d}",
                        "text": text,
                        "label": role,
                        "class_name": SENTENCE_CLASSES[role],
                        "split": section,
                        "abstract": number,
                        "position": position,
                    }
                )
            number += 1
    return records


# --------------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------------
def _dump(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8"))


def _jsonl(records: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def _datalist(
    records: list[dict[str, Any]],
    classes: Sequence[str],
    description: str,
    builder: dict[str, Any],
    extra: Sequence[str],
) -> dict[str, Any]:
    sections: dict[str, list[dict[str, Any]]] = {s: [] for s in SECTIONS}
    for r in records:
        item = {"text": r["text"], "label": r["label"], "modality": "TEXT", "dim": 1, "id": r["id"]}
        item.update({k: r[k] for k in extra})
        sections[r["split"]].append(item)
    return {
        "name": "medssl-demo-reports",
        "description": description,
        "reference": "medssl.data.reports",
        "licence": "Apache-2.0 (medssl; synthetic)",
        "builder": builder,
        "classes": list(classes),
        "numTraining": len(sections["training"]),
        "numValidation": len(sections["validation"]),
        "numTest": len(sections["test"]),
        **sections,
    }


def write_report_corpus(
    out_dir: str | os.PathLike,
    seed: int = 0,
    per_class: Sequence[int] | None = None,
    abstracts: Sequence[int] | None = None,
) -> dict[str, Path]:
    """Write the demo report corpus into ``out_dir`` (see the module docstring) and return the written paths.

    Args:
        out_dir: the demo dataset directory; files go to ``reports/reports.jsonl``, ``reports/sentences.jsonl``,
            ``datalist_reports.json`` and ``datalist_sentences.json`` (``paired_image`` paths relative to it).
        seed: the corpus seed (use the demo dataset's).
        per_class: reports per class in training / validation / test (default the learnability set's 2D counts,
            240 / 50 / 50, so that each report pairs with the learnability X-ray of the same index).
        abstracts: abstracts per section (default 150 / 30 / 30; 10 sentences each).

    Returns:
        ``{"reports", "sentences", "datalist_reports", "datalist_sentences"}`` -> path. The datalists are written
        last, ``datalist_reports.json`` after the other; :func:`report_corpus_is_current` tells whether a directory
        already holds this corpus.
    """
    out = Path(out_dir)
    reports = report_records(seed, per_class)
    sentences = sentence_records(seed, abstracts)
    builder = _builder_info(seed, per_class, abstracts)
    paths = {
        "reports": out / "reports" / "reports.jsonl",
        "sentences": out / "reports" / "sentences.jsonl",
        "datalist_reports": out / "datalist_reports.json",
        "datalist_sentences": out / "datalist_sentences.json",
    }
    _dump(paths["reports"], _jsonl(reports))
    _dump(paths["sentences"], _jsonl(sentences))
    lists = {
        "datalist_reports": _datalist(
            reports,
            REPORT_CLASSES,
            "medssl demo report corpus: synthetic chest X-ray reports, one per learnability X-ray (paired_image), "
            "classes normal / nodules / effusion (labels = the learnability set's XR labels); 'text' is the input.",
            builder,
            ("paired_image",),
        ),
        "datalist_sentences": _datalist(
            sentences,
            SENTENCE_CLASSES,
            "medssl demo report corpus: sentences of synthetic imaging-study abstracts, PubMed-20k-style roles "
            "background / objective / methods / results / conclusions; 'text' is the input.",
            builder,
            ("abstract", "position"),
        ),
    }
    # datalist_reports.json last and atomically: report_corpus_is_current trusts a build that has it
    for key in ("datalist_sentences", "datalist_reports"):
        temporary = paths[key].with_name(paths[key].name + ".tmp")
        _dump(temporary, json.dumps(lists[key], indent=1, ensure_ascii=False) + "\n")
        os.replace(temporary, paths[key])
    return paths


def _builder_info(seed: int, per_class: Sequence[int] | None, abstracts: Sequence[int] | None) -> dict[str, Any]:
    return {
        "module": "medssl.data.reports",
        "version": REPORTS_VERSION,
        "seed": int(seed),
        "per_class": [int(n) for n in (per_class if per_class is not None else PER_CLASS_2D)],
        "abstracts": [int(n) for n in (abstracts if abstracts is not None else ABSTRACTS_PER_SPLIT)],
    }


def report_corpus_is_current(
    out_dir: str | os.PathLike,
    seed: int = 0,
    per_class: Sequence[int] | None = None,
    abstracts: Sequence[int] | None = None,
) -> bool:
    """True when ``out_dir`` holds a complete corpus written by this :data:`REPORTS_VERSION` with these arguments
    (so that a demo build can reuse it instead of writing it again)."""
    out = Path(out_dir)
    expected = _builder_info(seed, per_class, abstracts)
    for name in ("datalist_reports.json", "datalist_sentences.json"):
        try:
            if json.loads((out / name).read_text(encoding="utf-8")).get("builder") != expected:
                return False
        except (OSError, ValueError, AttributeError):
            return False
    return all((out / "reports" / name).is_file() for name in ("reports.jsonl", "sentences.jsonl"))
