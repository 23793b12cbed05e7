"""Generate the small sample data set in examples/sample (deterministic; numpy + Pillow only).

Three episodes of four frames each: a textured corridor rendered by ray casting from a camera that walks
forward and turns a little, like an indoor navigation episode. Alongside: `train.jsonl` (Qwen-style
records with `images` and `conversations`) and a JanusVLN-style `annotations.json` (`history_images` +
`current_image`, resolved under `data_path`). File names deliberately include extra dots, a space and a
non-ASCII letter.

    python tools/make_sample_data.py [--out examples/sample]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

WIDTH, HEIGHT = 160, 120
FRAMES = 4
# (folder, file name pattern, format): extra dots, a space, a non-ASCII letter.
EPISODES = [("episode_000", "frame.{:03d}.jpg", "JPEG"),
            ("episode 001", "rgb_{:03d}.png", "PNG"),
            ("épisode_002", "frame_{:03d}.jpg", "JPEG")]
ACTIONS = ["MOVE_FORWARD", "TURN_LEFT", "TURN_RIGHT"]


def _palette(rng: np.random.RandomState) -> dict[str, np.ndarray]:
    return {name: rng.uniform(lo, hi, 3) for name, lo, hi in
            [("wall", 120, 220), ("floor", 60, 150), ("ceiling", 190, 245), ("door", 40, 120), ("end", 90, 200)]}


def render_corridor(x: float, z: float, yaw: float, colours: dict[str, np.ndarray],
                    noise: np.ndarray) -> np.ndarray:
    """Ray-cast one HxWx3 uint8 frame of a corridor (walls x=+-1, floor y=-0.6, ceiling y=0.9, end z=12)."""
    u = (np.arange(WIDTH) + 0.5) / WIDTH * 2 - 1
    v = 1 - (np.arange(HEIGHT) + 0.5) / HEIGHT * 2
    uu, vv = np.meshgrid(u * 0.9, v * 0.9 * HEIGHT / WIDTH)
    dx = uu * np.cos(yaw) + np.sin(yaw)
    dz = -uu * np.sin(yaw) + np.cos(yaw)
    dy = vv
    big = np.float64(1e9)
    with np.errstate(divide="ignore", invalid="ignore"):
        t_wall = np.where(dx > 0, (1 - x) / dx, np.where(dx < 0, (-1 - x) / dx, big))
        t_floor = np.where(dy < 0, -0.6 / dy, big)
        t_ceil = np.where(dy > 0, 0.9 / dy, big)
        t_end = np.where(dz > 0, (12 - z) / dz, big)
    t = np.minimum.reduce([t_wall, t_floor, t_ceil, t_end])
    px, py, pz = x + t * dx, t * dy, z + t * dz
    img = np.zeros((HEIGHT, WIDTH, 3))
    wall = t == t_wall
    floor = (t == t_floor) & ~wall
    ceil = (t == t_ceil) & ~wall & ~floor
    end = ~(wall | floor | ceil)
    stripes = 0.85 + 0.15 * (np.floor(pz * 2) % 2)
    door = wall & (np.abs((pz % 4) - 2) < 0.45) & (py < 0.5)
    img[wall] = colours["wall"] * stripes[wall][:, None]
    img[door] = colours["door"]
    tiles = 0.75 + 0.25 * ((np.floor(px * 3) + np.floor(pz * 3)) % 2)
    img[floor] = colours["floor"] * tiles[floor][:, None]
    lamp = ceil & (np.abs((pz % 3) - 1.5) < 0.25) & (np.abs(px) < 0.3)
    img[ceil] = colours["ceiling"]
    img[lamp] = 255
    img[end] = colours["end"] * (0.8 + 0.2 * np.sin(px[end] * 6))[:, None]
    shade = np.clip(1.2 / (1 + 0.12 * t), 0.25, 1.0)
    img = img * shade[..., None] + noise
    return np.clip(img, 0, 255).astype(np.uint8)


def make_episode(rng: np.random.RandomState) -> list[np.ndarray]:
    """Four frames of one walk: random start, forward steps, small turns."""
    colours = _palette(rng)
    x, z, yaw = rng.uniform(-0.3, 0.3), rng.uniform(0, 2), rng.uniform(-0.2, 0.2)
    frames = []
    for _ in range(FRAMES):
        noise = rng.normal(0, 4, (HEIGHT, WIDTH, 3))
        frames.append(render_corridor(x, z, yaw, colours, noise))
        z += 0.5
        yaw += rng.uniform(-0.12, 0.12)
        x = float(np.clip(x + 0.5 * np.sin(yaw), -0.7, 0.7))
    return frames


def write_sample(out: Path, seed: int = 0) -> list[list[str]]:
    """Write the frames and both annotation files under `out`; returns the frame paths per episode."""
    rng = np.random.RandomState(seed)
    if (out / "episodes").exists():
        shutil.rmtree(out / "episodes")
    episodes = []
    for folder, pattern, fmt in EPISODES:
        names = []
        for i, frame in enumerate(make_episode(rng)):
            rel = f"{folder}/{pattern.format(i)}"
            path = out / "episodes" / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            options = {"quality": 85} if fmt == "JPEG" else {"optimize": True}
            Image.fromarray(frame).save(path, fmt, **options)
            names.append(rel)
        episodes.append(names)
    _write_train_jsonl(out / "train.jsonl", episodes, rng)
    _write_annotations_json(out / "annotations.json", episodes, rng)
    return episodes


def _write_train_jsonl(path: Path, episodes: list[list[str]], rng: np.random.RandomState) -> None:
    lines = []
    for e, names in enumerate(episodes):
        images = [f"episodes/{n}" for n in names]
        lines.append({"id": f"ep{e:03d}", "images": images, "conversations": [
            {"from": "human", "value": "<image>" * len(images) + "\nWalk down the corridor and stop at the "
             "second door. What is your next action?"},
            {"from": "gpt", "value": ACTIONS[int(rng.randint(len(ACTIONS)))]}]})
    lines.append({"id": "single", "image": f"episodes/{episodes[0][-1]}", "conversations": [
        {"from": "human", "value": "<image>\nDescribe the scene."},
        {"from": "gpt", "value": "A long corridor with doors on both sides."}]})
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines), encoding="utf-8")


def _write_annotations_json(path: Path, episodes: list[list[str]], rng: np.random.RandomState) -> None:
    records = []
    for e, names in enumerate(episodes):
        records.append({"id": e, "data_path": "episodes", "video": names[0].split("/")[0],
                        "instructions": ["Walk down the corridor and stop at the second door."],
                        "history_images": names[:-1], "current_image": names[-1],
                        "actions": [ACTIONS[int(a)] for a in rng.randint(len(ACTIONS), size=FRAMES)]})
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def main() -> None:
    """Command-line entry: regenerate examples/sample."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "examples" / "sample",
                        help="output folder (default: examples/sample in this checkout)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    episodes = write_sample(args.out, args.seed)
    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"wrote {sum(map(len, episodes))} frames in {len(episodes)} episodes to {args.out} ({total} bytes)")


if __name__ == "__main__":
    main()
