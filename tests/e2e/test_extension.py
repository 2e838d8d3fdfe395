"""The extension in real Chromium against a real daemon: uploads on a local test site.

With the site turned on, every upload path (file input with fetch, file input in a shadow
root with XMLHttpRequest, drag and drop read by FileReader, paste read as a data URL)
delivers exactly one file to the site's server: protected bytes, same name and size in
pixels, the face's SFace embedding (OpenCV's own YuNet + SFace pipeline) moved away from
the original's. Turned off, the original bytes arrive. Without pairing or without the
daemon, nothing arrives and the page shows FaceCloak's explanation.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from upload_site import PAGES

pytestmark = pytest.mark.browser

PHOTO = "obama-240p.jpg"  # the smallest real photo: the fast preset takes ~20-40 s on a busy CPU
PROTECT_TIMEOUT_MS = 300_000
SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"


# -- helpers ---------------------------------------------------------------------------


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
        page.click("#editor")
        page.keyboard.press("Control+V")
    else:
        raise ValueError(kind)


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


@pytest.fixture(scope="module")
def embedder(store) -> SFaceEmbedder:
    return SFaceEmbedder(store)


@pytest.fixture
def page(extension):
    tab = extension.context.new_page()
    yield tab
    tab.close()


# -- tests -----------------------------------------------------------------------------


def test_pairing_on_the_options_page(extension):
    assert "Paired with the FaceCloak service." in extension.pairing_message
    assert "connected" in extension.pairing_message


@pytest.mark.parametrize("kind", PAGES)
def test_site_on_uploads_only_the_protected_photo(
    kind, extension, site, page, photos_dir, embedder, tmp_path
):
    photo = photos_dir / PHOTO
    original = photo.read_bytes()
    # On the fetch page a text file is picked along, before the photo: it must pass untouched.
    notes = tmp_path / "notes.txt"
    notes.write_text("not a photo\n")
    others = (notes,) if kind == "fetch" else ()
    page.goto(site.url(kind))
    extension.set_site(page, True)
    site.clear()
    page.locator("#picker" if kind in ("fetch", "xhr") else "h1").wait_for()
    upload(page, kind, photo, others)

    received = wait_for_upload(page, site, kind, files=1 + len(others))
    if others:
        first = site.received(kind)[0]
        assert (first.name, first.data) == ("notes.txt", notes.read_bytes())
    assert received.data != original
    if kind == "paste":
        # Chrome's clipboard holds a PNG of the pixels, named image.png.
        assert (received.name, received.content_type) == ("image.png", "image/png")
    else:
        assert (received.name, received.content_type) == (PHOTO, "image/jpeg")
        assert received.data[:3] == b"\xff\xd8\xff"  # still a JPEG
    before, after = rgb(original), rgb(received.data)
    assert after.shape == before.shape
    similarity = cosine(embedder(before), embedder(after))
    print(f"{kind}: SFace cosine original vs uploaded {similarity:.3f}")
    assert similarity < 0.5
    shown = notice(page)
    assert shown.get("kind") in ("done", None)  # the success card hides itself after a while


def test_popup_shows_progress_then_results(extension, site, page, photos_dir, tmp_path):
    page.goto(site.url("fetch"))
    extension.set_site(page, True)
    site.clear()
    popup = extension.open_popup(page, viewport={"width": 340, "height": 400})
    upload(page, "fetch", photos_dir / PHOTO)

    # Wait until the daemon reports some progress, so the bar shows it.
    popup.locator(
        "#activity li[data-state=running] .bar > div:not([style*='width: 0%'])"
    ).first.wait_for(timeout=PROTECT_TIMEOUT_MS)
    assert page.evaluate("document.getElementById('status').textContent") == "ready"
    assert notice(page)["kind"] == "progress"
    popup.screenshot(path=str(tmp_path / "popup-progress.png"))

    wait_for_upload(page, site, "fetch")
    popup.locator("#activity li[data-state=done]").first.wait_for()
    text = popup.locator("#activity li").first.inner_text()
    assert PHOTO in text and "Protected" in text and "1 face" in text
    assert popup.locator("#daemon-state").inner_text() == "Connected"
    popup.screenshot(path=str(tmp_path / "popup-done.png"))
    popup.close()
    if os.environ.get("FACECLOAK_UPDATE_SCREENSHOTS"):
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        for name in ("popup-progress.png", "popup-done.png"):
            shutil.copyfile(tmp_path / name, SCREENSHOTS / name)


def test_site_off_uploads_the_original(extension, site, page, photos_dir):
    photo = photos_dir / PHOTO
    page.goto(site.url("fetch"))
    extension.set_site(page, False)
    site.clear()
    upload(page, "fetch", photo)
    received = wait_for_upload(page, site, "fetch", timeout_ms=30_000)
    assert received.data == photo.read_bytes()
    assert notice(page) == {}


def _assert_held_back(page, site, kind: str, reason: str, hint: str) -> None:
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


def test_unpaired_upload_is_held_back(extension, daemon, site, page, photos_dir):
    page.goto(site.url("fetch"))
    extension.set_site(page, True)
    extension.unpair()
    site.clear()
    try:
        upload(page, "fetch", photos_dir / PHOTO)
        _assert_held_back(page, site, "fetch", "unpaired", "facecloak pair")
    finally:
        extension.pairing_message = extension.pair(daemon.pairing_code())
    assert "Paired with the FaceCloak service." in extension.pairing_message


@pytest.mark.parametrize("kind", ["fetch", "drop"])
def test_daemon_stopped_upload_is_held_back(kind, extension, daemon, site, page, photos_dir):
    daemon.stop()
    page.goto(site.url(kind))
    extension.set_site(page, True)
    site.clear()
    page.locator("#picker" if kind == "fetch" else "#zone").wait_for()
    upload(page, kind, photos_dir / PHOTO)
    _assert_held_back(page, site, kind, "unreachable", "facecloak serve")
    popup = extension.open_popup(page)
    assert popup.locator("#daemon-state").inner_text() == "Not running"
    popup.close()
