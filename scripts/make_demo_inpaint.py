"""Regenerate the inpainting demo's inputs (committed to the repo): data/inpaint/*.png and
data/inpaint_demo.parquet.

Small procedural scenes and masks (white = repaint), in a few sizes so the demo shows the
reference's sizing (sides floored to multiples of 64, aspect ratio kept). The table refers to
the files by paths relative to the repo root, where the demo runs.
"""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "data" / "inpaint"

# name, size, what to draw, mask box, prompt
SCENES = [
    ("house", (128, 128), "house", (40, 48, 100, 112), "a red wooden house with a green door"),
    ("lake", (192, 128), "lake", (20, 70, 120, 120), "a small white boat on a calm lake"),
    ("tower", (100, 150), "tower", (30, 10, 80, 60), "a full moon behind thin clouds"),
    ("field", (128, 128), "field", (0, 0, 128, 40), "a sky full of hot air balloons"),
]


def scene(kind: str, size: tuple[int, int]) -> Image.Image:
    w, h = size
    image = Image.new("RGB", size)
    draw = ImageDraw.Draw(image)
    for y in range(h):  # sky gradient over grass
        t = y / h
        sky = (int(90 + 120 * t), int(150 + 80 * t), 235)
        draw.line([(0, y), (w, y)], fill=sky if t < 0.6 else (70, int(140 + 40 * t), 60))
    if kind == "house":
        draw.rectangle([44, 60, 96, 108], fill=(180, 170, 150))
        draw.polygon([(40, 62), (70, 36), (100, 62)], fill=(120, 60, 50))
    elif kind == "lake":
        draw.ellipse([10, 70, 182, 124], fill=(60, 110, 170))
    elif kind == "tower":
        draw.rectangle([40, 60, 60, 140], fill=(150, 150, 160))
    else:
        draw.ellipse([90, 8, 118, 36], fill=(250, 220, 90))
    return image


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    rows = {"id": [], "prompt": [], "image": [], "mask": []}
    for name, size, kind, box, prompt in SCENES:
        scene(kind, size).save(OUT / f"{name}.png")
        mask = Image.new("L", size, 0)
        ImageDraw.Draw(mask).rectangle(box, fill=255)
        mask.save(OUT / f"{name}_mask.png")
        rows["id"].append(f"inpaint-{name}")
        rows["prompt"].append(prompt)
        rows["image"].append(f"data/inpaint/{name}.png")
        rows["mask"].append(f"data/inpaint/{name}_mask.png")
    table = pa.table({k: pa.array(v, pa.string()) for k, v in rows.items()})
    pq.write_table(table, ROOT / "data" / "inpaint_demo.parquet")
    print(f"wrote {len(SCENES)} images and masks to {OUT} and data/inpaint_demo.parquet")


if __name__ == "__main__":
    main()
