"""TotalSegmentator v2 "total" classes, the named anatomy groups built from them, and the default
finding -> anatomy map. Neutral ground: ingest, the recipes and the phantoms all import it.

The class list is TotalSegmentator's own (`totalsegmentator.map_to_binary.class_map["total"]`,
ids 1..117), kept here so that ingest with precomputed masks does not need the package: it pulls
nnU-Net -> timm -> torchvision, which pins a newer torch than ctray requires. A test checks this
copy against the package wherever the package is installed.
"""

from __future__ import annotations

TOTAL_CLASSES: tuple[str, ...] = (
    "spleen",
    "kidney_right",
    "kidney_left",
    "gallbladder",
    "liver",
    "stomach",
    "pancreas",
    "adrenal_gland_right",
    "adrenal_gland_left",
    "lung_upper_lobe_left",
    "lung_lower_lobe_left",
    "lung_upper_lobe_right",
    "lung_middle_lobe_right",
    "lung_lower_lobe_right",
    "esophagus",
    "trachea",
    "thyroid_gland",
    "small_bowel",
    "duodenum",
    "colon",
    "urinary_bladder",
    "prostate",
    "kidney_cyst_left",
    "kidney_cyst_right",
    "sacrum",
    "vertebrae_S1",
    "vertebrae_L5",
    "vertebrae_L4",
    "vertebrae_L3",
    "vertebrae_L2",
    "vertebrae_L1",
    "vertebrae_T12",
    "vertebrae_T11",
    "vertebrae_T10",
    "vertebrae_T9",
    "vertebrae_T8",
    "vertebrae_T7",
    "vertebrae_T6",
    "vertebrae_T5",
    "vertebrae_T4",
    "vertebrae_T3",
    "vertebrae_T2",
    "vertebrae_T1",
    "vertebrae_C7",
    "vertebrae_C6",
    "vertebrae_C5",
    "vertebrae_C4",
    "vertebrae_C3",
    "vertebrae_C2",
    "vertebrae_C1",
    "heart",
    "aorta",
    "pulmonary_vein",
    "brachiocephalic_trunk",
    "subclavian_artery_right",
    "subclavian_artery_left",
    "common_carotid_artery_right",
    "common_carotid_artery_left",
    "brachiocephalic_vein_left",
    "brachiocephalic_vein_right",
    "atrial_appendage_left",
    "superior_vena_cava",
    "inferior_vena_cava",
    "portal_vein_and_splenic_vein",
    "iliac_artery_left",
    "iliac_artery_right",
    "iliac_vena_left",
    "iliac_vena_right",
    "humerus_left",
    "humerus_right",
    "scapula_left",
    "scapula_right",
    "clavicula_left",
    "clavicula_right",
    "femur_left",
    "femur_right",
    "hip_left",
    "hip_right",
    "spinal_cord",
    "gluteus_maximus_left",
    "gluteus_maximus_right",
    "gluteus_medius_left",
    "gluteus_medius_right",
    "gluteus_minimus_left",
    "gluteus_minimus_right",
    "autochthon_left",
    "autochthon_right",
    "iliopsoas_left",
    "iliopsoas_right",
    "brain",
    "skull",
    "rib_left_1",
    "rib_left_2",
    "rib_left_3",
    "rib_left_4",
    "rib_left_5",
    "rib_left_6",
    "rib_left_7",
    "rib_left_8",
    "rib_left_9",
    "rib_left_10",
    "rib_left_11",
    "rib_left_12",
    "rib_right_1",
    "rib_right_2",
    "rib_right_3",
    "rib_right_4",
    "rib_right_5",
    "rib_right_6",
    "rib_right_7",
    "rib_right_8",
    "rib_right_9",
    "rib_right_10",
    "rib_right_11",
    "rib_right_12",
    "sternum",
    "costal_cartilages",
)
"""Class names in id order: TOTAL_CLASSES[i - 1] is the name of label id i."""

CLASS_IDS: dict[str, int] = {name: i + 1 for i, name in enumerate(TOTAL_CLASSES)}

_VERTEBRAE = tuple(n for n in TOTAL_CLASSES if n.startswith("vertebrae_"))
_RIBS = tuple(n for n in TOTAL_CLASSES if n.startswith("rib_"))

DEFAULT_ANATOMIES: dict[str, list[str]] = {
    "lung": [
        "lung_upper_lobe_left",
        "lung_lower_lobe_left",
        "lung_upper_lobe_right",
        "lung_middle_lobe_right",
        "lung_lower_lobe_right",
    ],
    "heart": ["heart", "atrial_appendage_left"],
    "esophagus": ["esophagus"],
    "aorta": ["aorta"],
    "liver": ["liver"],
    "spleen": ["spleen"],
    "kidney": ["kidney_right", "kidney_left", "kidney_cyst_left", "kidney_cyst_right"],
    "pancreas": ["pancreas"],
    "stomach": ["stomach"],
    "gallbladder": ["gallbladder"],
    "bowel": ["small_bowel", "duodenum", "colon"],
    "bladder": ["urinary_bladder"],
    "bone": [
        *_VERTEBRAE,
        "sacrum",
        *_RIBS,
        "sternum",
        "costal_cartilages",
        "humerus_left",
        "humerus_right",
        "scapula_left",
        "scapula_right",
        "clavicula_left",
        "clavicula_right",
        "femur_left",
        "femur_right",
        "hip_left",
        "hip_right",
        "skull",
    ],
}
"""Anatomy name -> TotalSegmentator classes; the defaults of `preprocess.anatomies`."""

DEFAULT_FINDINGS: dict[str, str] = {
    "lung_nodule": "lung",
    "cardiomegaly": "heart",
    "aortic_dilation": "aorta",
    "liver_lesion": "liver",
    "splenomegaly": "spleen",
    "kidney_cyst": "kidney",
    "bone_lesion": "bone",
}
"""Finding label -> the anatomy whose report sentences describe it: the default finding set of the
recipes' zero-shot evaluation and anatomy lists (real data names its own labels in the job). The
synthetic phantoms draw their lesions from it."""

DEFAULT_FINDING_ANATOMIES: list[str] = sorted(set(DEFAULT_FINDINGS.values()))
"""The anatomies of DEFAULT_FINDINGS: the default anatomies of TotalFM's organs and CA-GCL's queries."""


def anatomy_label_ids(anatomies: dict[str, list[str]]) -> dict[str, list[int]]:
    """Resolve class names to label ids, with a clear error naming an unknown class."""
    out: dict[str, list[int]] = {}
    for anatomy, classes in anatomies.items():
        unknown = [c for c in classes if c not in CLASS_IDS]
        if unknown:
            raise ValueError(f"anatomy {anatomy!r}: unknown TotalSegmentator class(es) {unknown}")
        out[anatomy] = sorted(CLASS_IDS[c] for c in classes)
    return out
