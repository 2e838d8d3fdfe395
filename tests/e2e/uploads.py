"""Helpers of the browser end-to-end tests: handing a page a photo the way a user would,
reading FaceCloak's notice, waiting for uploads, and an independent face embedder."""

from __future__ import annotations

import base64
import io
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image

PHOTO = "obama-240p.jpg"  # the smallest real photo: the fast preset takes ~5-40 s on a busy CPU
PROTECT_TIMEOUT_MS = 300_000


def upload(page, kind: str, path: Path, others: tuple[Path, ...] = ()) -> None:
    """Hand ``path`` to the page the way a user would: pick, drop or paste it.

    ``others`` are picked along with it, before it (file inputs only).
    """
    if kind in ("fetch", "xhr"):
        files = [str(p) for p in (*others, path)]
        page.locator("#picker").set_input_files(files)  # trusted input/change events
    elif kind == "drop":
        box = page.locator("#zone").bounding_box()
        cdp = page.context.new_cdp_session(page)
        data = {"items": [], "files": [str(path)], "dragOperationsMask": 1}
        for step in ("dragEnter", "dragOver", "drop"):  # a real drag of a file from the desktop
            cdp.send(
                "Input.dispatchDragEvent",
                {"type": step, "x": box["x"] + 40, "y": box["y"] + 40, "data": data},
            )
        cdp.detach()
    elif kind == "paste":
        # Put the photo on the clipboard as an image, then press Ctrl+V in the page.
        copy_image(page, path)
        page.click("#editor")
        page.keyboard.press("Control+V")
    else:
        raise ValueError(kind)


def assert_protected(data: bytes, original: bytes, embedder) -> None:
    """``data``, what a site received, is a JPEG of the original's size whose face an
    independent recogniser no longer matches to the original's."""
    assert data != original, "the site received the original photo"
    assert data[:3] == b"\xff\xd8\xff"
    before, after = rgb(original), rgb(data)
    assert after.shape == before.shape
    assert cosine(embedder(before), embedder(after)) < 0.5


def upload_copies(extension, daemon, site, page, photo: Path, folder: Path, names, embedder):
    """Pick copies of ``photo`` named ``names`` together (one upload) on the site's
    ``fetch`` page, the site turned on; wait until the site received all of them and check
    each is protected. Returns what the site received, in order, and what the daemon
    logged meanwhile."""
    copies = [folder / name for name in names]
    for path in copies:
        shutil.copyfile(photo, path)
    page.goto(site.url("fetch"))
    extension.set_site(page, True)
    site.clear()
    logged = daemon.log_path.stat().st_size
    page.locator("#picker").set_input_files([str(p) for p in copies])
    site.wait_for("fetch", count=len(copies), timeout_s=PROTECT_TIMEOUT_MS / 1000)
    uploads = site.received("fetch")
    for upload in uploads:
        assert_protected(upload.data, photo.read_bytes(), embedder)
    with daemon.log_path.open("rb") as log:
        log.seek(logged)
        return uploads, log.read()


def copy_image(page, path: Path) -> None:
    """Put the photo at ``path`` on the page's clipboard as a PNG image."""
    page.evaluate(
        """async (b64) => {
          const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
          const bitmap = await createImageBitmap(new Blob([bytes]));
          const canvas = new OffscreenCanvas(bitmap.width, bitmap.height);
          canvas.getContext("2d").drawImage(bitmap, 0, 0);
          const png = await canvas.convertToBlob({ type: "image/png" });
          await navigator.clipboard.write([new ClipboardItem({ "image/png": png })]);
        }""",
        base64.b64encode(path.read_bytes()).decode(),
    )


def notice(page) -> dict:
    """FaceCloak's notice in the page: its kind, reason and text ({} when there is none)."""
    return page.evaluate(
        """() => {
          const host = document.getElementById("facecloak-notice");
          if (!host) return {};
          return { kind: host.dataset.kind, reason: host.dataset.reason,
                   text: host.shadowRoot.querySelector(".card").innerText };
        }"""
    )


def wait_for_upload(page, site, kind: str, timeout_ms: int = PROTECT_TIMEOUT_MS, files: int = 1):
    """Wait until the page reports its upload; returns the last of the ``files`` received.

    Fails if the server received any other number of files (an original sent as well).
    """
    page.wait_for_function(
        "() => document.getElementById('status').textContent.startsWith('uploaded')",
        timeout=timeout_ms,
    )
    time.sleep(0.5)  # a second upload (an original sent as well) would arrive by now
    received = site.received(kind)
    assert len(received) == files, f"expected {files} uploaded file(s), got {len(received)}"
    return received[-1]


class SFaceEmbedder:
    """OpenCV's YuNet detection and SFace alignment, SFace features from onnxruntime.

    Independent of cloak_core's torch models; only the weight files come from the store.
    (OpenCV's own FaceRecognizerSF cannot run the block-quantized SFace file: it has 29
    unused weight inputs, which onnxruntime is simply fed zeros for.)
    """

    def __init__(self, store) -> None:
        import cv2
        import onnxruntime

        self.cv2 = cv2
        self.detector = cv2.FaceDetectorYN.create(
            str(store.resolve("yunet_int8bq.onnx")), "", (320, 320), 0.6, 0.3, 50
        )
        self.aligner = cv2.FaceRecognizerSF.create(str(store.resolve("sface_int8bq.onnx")), "")
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        self.sface = onnxruntime.InferenceSession(
            str(store.resolve("sface_int8bq.onnx")), options, providers=["CPUExecutionProvider"]
        )
        inputs = self.sface.get_inputs()
        self.unused = {i.name: np.zeros(i.shape, np.float32) for i in inputs if i.name != "data"}

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        """The largest face's 128-d SFace feature of an RGB uint8 ``(H, W, 3)`` image."""
        bgr = self.cv2.cvtColor(rgb, self.cv2.COLOR_RGB2BGR)
        self.detector.setInputSize((bgr.shape[1], bgr.shape[0]))
        _, faces = self.detector.detect(bgr)
        assert faces is not None and len(faces), "no face found"
        face = max(faces, key=lambda f: f[2] * f[3])
        aligned = self.aligner.alignCrop(bgr, face)  # (112, 112, 3) BGR
        # SFace takes RGB in 0..255, (1, 3, 112, 112); it normalises inside.
        data = aligned[:, :, ::-1].transpose(2, 0, 1)[None].astype(np.float32)
        (feature,) = self.sface.run(["fc1"], {"data": data, **self.unused})
        return feature.ravel().astype(np.float64)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def rgb(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def assert_held_back(page, site, kind: str, reason: str, hint: str) -> None:
    """Wait for FaceCloak's error notice (``reason``, with ``hint`` in its text) and check
    that nothing reached the site."""
    page.wait_for_function(
        "() => document.getElementById('facecloak-notice')?.dataset.kind === 'error'",
        timeout=60_000,
    )
    shown = notice(page)
    assert shown["reason"] == reason
    assert "nothing was uploaded" in shown["text"].lower()
    assert hint in shown["text"]
    time.sleep(1.0)
    assert site.received(kind) == []
    assert page.text_content("#status") == "ready"
    if kind in ("fetch", "xhr"):  # the input was cleared: the page cannot read the original
        assert page.locator("#picker").evaluate("(input) => input.files.length") == 0
