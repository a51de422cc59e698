"""Questions, task instructions and their answers for the shapes world (issue 18).

VQA: every answer is one lowercase word or one digit; every question ends with "Answer with a single word.".
Task instructions follow the official VisionLLM v2 data (datasets/coco_llava.py, ade20k_llava.py,
coco_pose_llava.py of OpenGVLab/VisionLLM): the class list joined by ", " in the question, and the answer
names each class followed by its routing token and the K query tokens, "red circle[DET][EMB][EMB2][EMB3][EMB4],
blue square[DET]...". POSE is the official two-part turn: a detection question for the object classes, then
" " + a keypoint question for the keypoint names; the answer is the detection answer + " " + the keypoint
answer with a [POSE] group per keypoint name. The eval strings (`*_EVAL`) are fixed; training draws
paraphrases from the official template lists (a subset of them, quoted from the official files).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Optional

from .world import CLASSES, COLOURS, KEYPOINT_NAMES, SHAPES, Scene

SINGLE_WORD = "Answer with a single word."

DET_EVAL = "Please perform object detection on this image for identifying <class>."
DET_QUESTIONS = [
    DET_EVAL,
    "Can you analyze the image and identify the <class> present?",
    "In this image, could you detect all instances of <class>?",
    "I need your expertise to locate <class> in this image.",
    "Please identify and list any <class> in the given image using object detection.",
    "Detect any <class> in the given image, if possible.",
]
SEG_EVAL = "Please accurately segment and generate masks for all the categories falling under <class> in this image."
SEG_QUESTIONS = [
    SEG_EVAL,
    "Could you aid me in generating unique masks for every category present in <class> in this image?",
    "Please segment the different categories falling under <class> in this image and generating masks for each.",
    "Generate masks that accurately depict each category belonging to <class> in this image.",
    "Please create masks that are distinct for each category belonging to <class> in this image.",
]
POSE_EVAL = "Please inspect the image and locate the keypoints for <class>."
POSE_QUESTIONS = [
    POSE_EVAL,
    "Can you examine the image and pinpoint the keypoint locations of the <class>?",
    "Please analyze this image and find the keypoints of <class>.",
    "Look at the image and detect the keypoint positions of the <class>.",
]
YES_EVAL = "Yes, here are the results for <class> in the image."
YES = [
    YES_EVAL,
    "Certainly, the image shows the results for <class>.",
    "Absolutely, you can see the results for <class> in the image.",
    "Sure, the image contains the detection results for <class>.",
]
POSE_ANS_EVAL = "Utilizing keypoints detection, the image analysis reveals the location of <class>."
POSE_ANS = [POSE_ANS_EVAL, "The keypoints of <class> are located as shown in the image."]

VQA_TYPES = ("count_all", "count_colour", "count_shape", "colour_of", "shape_of", "exists")
TASKS = ("vqa", "det", "seg", "pose")
ROUTE_OF_TASK = {"vqa": (), "det": ("[DET]",), "seg": ("[SEG]",), "pose": ("[DET]", "[POSE]")}


@dataclass
class Sample:
    task: str  # vqa / det / seg / pose
    question: str  # the user turn, without <image>
    answer: str  # the assistant turn, routing tokens followed by their query tokens
    qtype: str = ""  # VQA question type
    classes: list[str] = field(default_factory=list)  # object classes named (det / seg / pose), in order
    keypoints: list[str] = field(default_factory=list)  # keypoint names (pose), in order
    pose_shape: Optional[str] = None
    turns: list["Sample"] = field(default_factory=list)  # training: later VQA turns of the same conversation


def query_tokens(num_embs: int) -> str:
    return "[EMB]" + "".join(f"[EMB{i}]" for i in range(2, num_embs + 1))


def routed_list(names: list[str], route: str, num_embs: int) -> str:
    """'a[DET][EMB].., b[DET][EMB]..' (the official answer's class list)."""
    return ", ".join(f"{n}{route}{query_tokens(num_embs)}" for n in names)


def strip_queries(answer: str) -> str:
    """The answer as the engine prints it: routing tokens kept, query tokens dropped."""
    for i in range(8, 1, -1):
        answer = answer.replace(f"[EMB{i}]", "")
    return answer.replace("[EMB]", "")


def vqa_sample(scene: Scene, rng: random.Random, qtype: Optional[str] = None) -> Sample:
    """One VQA question of `qtype` (or a random type whose precondition the scene meets)."""
    options = []
    colours, shapes = list(COLOURS), list(SHAPES)
    options.append(("count_all", "How many shapes are in the image?", str(len(scene.objects))))
    c = rng.choice(colours)
    options.append(("count_colour", f"How many {c} shapes are there?", str(scene.count(colour=c))))
    s = rng.choice(shapes)
    options.append(("count_shape", f"How many {s}s are there?", str(scene.count(shape=s))))
    single_shape = [s for s in shapes if scene.count(shape=s) == 1]
    if single_shape:
        s = rng.choice(single_shape)
        colour = next(o.colour for o in scene.objects if o.shape == s)
        options.append(("colour_of", f"What color is the {s}?", colour))
    single_colour = [c for c in colours if scene.count(colour=c) == 1]
    if single_colour:
        c = rng.choice(single_colour)
        shape = next(o.shape for o in scene.objects if o.colour == c)
        options.append(("shape_of", f"What shape is the {c} object?", shape))
    # yes / no balanced: half the time ask about a class that is present
    present = scene.class_names()
    name = rng.choice(present) if rng.random() < 0.5 else rng.choice(list(CLASSES))
    options.append(("exists", f"Is there a {name}?", "yes" if name in present else "no"))
    if qtype is not None:
        options = [o for o in options if o[0] == qtype]
        if not options:
            raise ValueError(f"scene {scene.seed} has no {qtype} question")
    t, q, a = rng.choice(options)
    return Sample("vqa", f"{q} {SINGLE_WORD}", a, qtype=t)


def class_list(scene: Scene, rng: random.Random, train: bool) -> list[str]:
    """Eval: all 12 classes in their fixed order. Train (official): half the time all classes (shuffled, or in
    the fixed order one time in four: the eval's list), else the present classes plus a random number of absent
    ones, shuffled."""
    if not train:
        return list(CLASSES)
    names = list(CLASSES)
    if rng.random() < 0.5:
        if rng.random() < 0.5:
            rng.shuffle(names)
        return names
    pos = scene.class_names()
    neg = [c for c in CLASSES if c not in pos]
    rng.shuffle(neg)
    out = pos + neg[:rng.randint(0, len(neg))]
    rng.shuffle(out)
    return out


def det_sample(scene: Scene, rng: random.Random, num_embs: int, train: bool = True, route: str = "[DET]"
               ) -> Sample:
    names = class_list(scene, rng, train)
    qs, task = (DET_QUESTIONS, "det") if route == "[DET]" else (SEG_QUESTIONS, "seg")
    q = (rng.choice(qs) if train else qs[0]).replace("<class>", ", ".join(names))
    a = (rng.choice(YES) if train else YES_EVAL).replace("<class>", routed_list(names, route, num_embs))
    return Sample(task, q, a, classes=names)


def pose_shapes(scene: Scene) -> list[str]:
    return [s for s in SHAPES if KEYPOINT_NAMES[s] and scene.count(shape=s)]


def pose_sample(scene: Scene, rng: random.Random, num_embs: int, shape: Optional[str] = None, train: bool = True
                ) -> Sample:
    """Keypoints of one shape kind (square or triangle): the object classes are that kind's classes (eval: all
    four colours in fixed order; train: that list one time in four, else the present ones plus random absent
    ones), keypoints its names in order."""
    kinds = pose_shapes(scene)
    if shape is None:
        if not kinds:
            raise ValueError(f"scene {scene.seed} has no square or triangle")
        shape = rng.choice(kinds)
    all_names = [f"{c} {shape}" for c in COLOURS]
    if train:
        if rng.random() < 0.25:
            names = all_names  # the eval's list
        else:
            pos = [n for n in all_names if any(o.name == n for o in scene.objects)]
            neg = [n for n in all_names if n not in pos]
            rng.shuffle(neg)
            names = pos + neg[:rng.randint(0, len(neg))]
            rng.shuffle(names)
    else:
        names = all_names
    kpts = list(KEYPOINT_NAMES[shape])
    dq = (rng.choice(DET_QUESTIONS) if train else DET_EVAL).replace("<class>", ", ".join(names))
    pq = (rng.choice(POSE_QUESTIONS) if train else POSE_EVAL).replace("<class>", ", ".join(kpts))
    da = (rng.choice(YES) if train else YES_EVAL).replace("<class>", routed_list(names, "[DET]", num_embs))
    pa = (rng.choice(POSE_ANS) if train else POSE_ANS_EVAL).replace("<class>", routed_list(kpts, "[POSE]", num_embs))
    return Sample("pose", f"{dq} {pq}", f"{da} {pa}", classes=names, keypoints=kpts, pose_shape=shape)


def corpus_lines(num_embs: int = 4) -> list[str]:
    """Every word the world's text uses, for training the BPE tokenizer."""
    rng = random.Random(0)
    from .world import make_scene

    lines = []
    for seed in range(300):
        sc = make_scene(10_000_000 + seed)
        for t in VQA_TYPES:
            try:
                s = vqa_sample(sc, rng, t)
                lines += [s.question, s.answer]
            except ValueError:
                pass
        for s in (det_sample(sc, rng, num_embs), det_sample(sc, rng, num_embs, route="[SEG]")):
            lines += [s.question, strip_queries(s.answer)]
        if pose_shapes(sc):
            s = pose_sample(sc, rng, num_embs)
            lines += [s.question, strip_queries(s.answer)]
    lines += [str(i) for i in range(10)] + ["yes", "no"] + list(COLOURS) + list(SHAPES)
    return lines
