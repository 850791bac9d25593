"""The built-in demo dataset: synthetic images that reproduce the threshold problem of CAMs.

Every object is a *body* carrying a few small *marks*:

- The body (ellipse, wobbly blob or rounded polygon; long axis 22-90 % of the image side,
  log-uniform; aspect and rotation random) has a look that is shared by all classes: one
  saturated colour of any hue with a gentle brightness gradient and weak noise. Nothing about
  the body tells its class.
- A mark is a small glyph (3-10 % of the body's area each) whose form *and* colour identify
  the class (a red disk, a yellow ring, ...), drawn with a 1-px near-black outline so that it
  stands out on any body colour. An object has 1-4 marks of its class, spread over the body
  like the discriminative parts of a real object (all marks together: median ~11 %, 90th
  percentile ~18 % of the body). Marks are always fully visible: later objects, which may
  overlap earlier ones, never cover them.
- The ground-truth mask is the whole body (marks included).

So image labels are solvable from the marks alone and a classifier's CAM fires on the marks,
while the target is the body: how far a CAM must be thresholded to cover its body depends on
the body's size and on how many marks it has and how large they are, which vary widely from
object to object. A single global threshold is then wrong for many images and per-image optimal
thresholds spread, which is the phenomenon "Threshold Matters in WSSS" (CVPR 2022) is about.
(With a single mark per object and output stride 8, CAMs were too peaky: the best global
threshold sat at the bottom of the range, ~0.05. Several marks and a wider range of body sizes
moved it to ~0.10 and spread the per-image optimum; see ``marks_per_object``, ``body_range``.)

Eight classes, not fewer: AMN is trained with label smoothing eps = 0.4 spread over the C other
channels, so on confident background its softmax for a foreground class settles near eps / C
(VOC, C = 20: 0.02). With six classes that floor was 0.067 and a quarter of the background
pixels scored above 0.10, the bottom of the robust threshold range; eight classes (0.05) bring
the demo closer to the method's regime (the generator allows at most ``len(MARKS)`` = 8).

The background is textured (low-frequency shading, desaturated clutter shapes, pixel noise) but
always low in saturation, so bodies are separable from it by colour and a dense CRF with a
narrow colour kernel (srgb 5) can follow body edges, while body interiors are smooth enough
(noise std 2) for its bilateral kernel to spread a label across them.

The data is written in the "folder" format, the same format users' own data uses::

    root/images/<stem>.png     RGB
    root/masks/<stem>.png      index PNG: 0 background, 1..C classes, 255 on the 1-px inner
                               contour of every object (like the ignore borders of VOC masks;
                               ``ignore_border=0`` turns this off)
    root/classes.txt           one class name per line (class i+1 of the masks is line i)
    root/labels.csv            header ``stem,classes``; class names joined by ``;``
    root/splits/train.txt      stems, one per line
    root/splits/val.txt
    root/demo.json             the generation parameters; written last, marks a complete demo

Stems are ``train_0000``, ``val_0000``, ... Each image is a deterministic function of
(seed, split, index) and the parameters, so the files are byte-identical across runs.

Where things are: ``params`` (classes, ``DemoParams``, samples, stems), ``scene`` (random layout
and ``render_sample``), ``draw`` (pixel painting), ``files`` (``generate_demo``, writing the
folder atomically).
"""

from amnseg.data.demo.files import ensure_demo, generate_demo, is_complete_demo
from amnseg.data.demo.params import (
    DEMO_VERSION,
    MARKS,
    SPLITS,
    DemoObject,
    DemoParams,
    DemoSample,
    all_stems,
    split_stems,
)
from amnseg.data.demo.scene import render_sample

__all__ = [
    "DEMO_VERSION",
    "MARKS",
    "SPLITS",
    "DemoObject",
    "DemoParams",
    "DemoSample",
    "all_stems",
    "ensure_demo",
    "generate_demo",
    "is_complete_demo",
    "render_sample",
    "split_stems",
]
