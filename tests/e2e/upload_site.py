"""A local test site with photo-upload pages, and a server that records every upload.

Pages (each shows ``#status`` "uploaded N" once its upload request has been answered):

- ``/fetch``: a plain ``<input type=file>``; the page posts ``FormData`` with ``fetch``.
- ``/xhr``: the file input is created after load inside an open shadow root; the page
  posts ``FormData`` with ``XMLHttpRequest``.
- ``/drop``: a drop zone; the page reads each file with ``FileReader.readAsArrayBuffer``
  and posts the raw bytes with ``fetch``.
- ``/paste``: the page reads pasted image files with ``FileReader.readAsDataURL`` and
  posts them as JSON with ``XMLHttpRequest``.

Pages that open file pickers in ways no event shows (each uploads with ``fetch``):

- ``/detached``: ``#pick`` creates an ``<input type=file>`` that is never in the document
  and calls its ``click()``.
- ``/showpicker``: the same, with ``showPicker()``.
- ``/removed``: ``#picker`` is in the document until it is clicked, then removed.

Pages with frames of other origins (each frame uploads with ``fetch``):

- ``/frame``: a frame from ``http://localhost:PORT/framed`` (another site) with ``#picker``.
- ``/sandboxed``: a sandboxed ``srcdoc`` frame (an opaque origin) with ``#picker``.

The server runs on 127.0.0.1 at a random port, in its own thread; it also answers as
``localhost``.
"""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from dataclasses import dataclass
from urllib.parse import unquote

from aiohttp import web
from widget_pages import NODE_MODULES, WIDGETS, widget_page

_HEAD = """<!doctype html><html><head><meta charset="utf-8"><title>{title}</title></head>
<body><h1>{title}</h1>{body}<p id="status">ready</p>
<script>
let uploaded = 0;
function done(ok) {{
  uploaded += ok ? 1 : 0;
  document.getElementById("status").textContent = ok ? "uploaded " + uploaded : "upload failed";
}}
{script}
</script></body></html>"""

_PAGES = {
    "fetch": (
        "Upload with fetch and FormData",
        '<input type="file" id="picker" accept="image/*" multiple>',
        """
document.getElementById("picker").addEventListener("change", async (event) => {
  const files = [...event.target.files];
  if (!files.length) return;
  const form = new FormData();
  for (const f of files) form.append("photo", f, f.name);
  const response = await fetch("/upload/fetch", { method: "POST", body: form });
  done(response.ok);
});
""",
    ),
    "xhr": (
        "Upload with XMLHttpRequest from a shadow root",
        '<upload-box id="box"></upload-box>',
        """
// The input is created after load, inside a shadow root.
window.addEventListener("load", () => setTimeout(() => {
  const root = document.getElementById("box").attachShadow({ mode: "open" });
  const input = document.createElement("input");
  input.type = "file";
  input.id = "picker";
  input.multiple = true;
  input.addEventListener("change", () => {
    const files = [...input.files];
    if (!files.length) return;
    const form = new FormData();
    for (const f of files) form.append("photo", f, f.name);
    const xhr = new XMLHttpRequest();
    xhr.open("POST", "/upload/xhr");
    xhr.onload = () => done(xhr.status === 200);
    xhr.send(form);
  });
  root.append(input);
}, 50));
""",
    ),
    "drop": (
        "Drag and drop, read with FileReader",
        '<div id="zone" style="width:400px;height:300px;border:3px dashed #888">'
        "Drop photos here</div>",
        """
const zone = document.getElementById("zone");
zone.addEventListener("dragover", (e) => e.preventDefault());
zone.addEventListener("drop", (e) => {
  e.preventDefault();
  for (const f of e.dataTransfer.files) {
    const reader = new FileReader();
    reader.onload = async () => {
      const response = await fetch("/upload/drop", {
        method: "POST",
        headers: { "Content-Type": f.type, "X-Filename": encodeURIComponent(f.name) },
        body: reader.result,
      });
      done(response.ok);
    };
    reader.readAsArrayBuffer(f);
  }
});
""",
    ),
    "paste": (
        "Paste, read as a data URL",
        '<textarea id="editor" rows="4" cols="40" placeholder="Paste a photo here"></textarea>',
        """
document.addEventListener("paste", (e) => {
  for (const f of e.clipboardData.files) {
    e.preventDefault();
    const reader = new FileReader();
    reader.onload = () => {
      const xhr = new XMLHttpRequest();
      xhr.open("POST", "/upload/paste");
      xhr.setRequestHeader("Content-Type", "application/json");
      xhr.onload = () => done(xhr.status === 200);
      xhr.send(JSON.stringify({ name: f.name, type: f.type, dataUrl: reader.result }));
    };
    reader.readAsDataURL(f);
  }
});
""",
    ),
}

_SEND = """
async function send(files, page) {
  if (!files.length) return;
  const form = new FormData();
  for (const f of files) form.append("photo", f, f.name);
  const response = await fetch("/upload/" + page, { method: "POST", body: form });
  done(response.ok);
}
"""

_PICKER_PAGES = {
    "detached": (
        "A file input that is never in the document",
        '<button id="pick">Choose a photo</button>',
        _SEND
        + """
document.getElementById("pick").addEventListener("click", () => {
  const input = document.createElement("input");
  input.type = "file";
  input.accept = "image/*";
  input.addEventListener("change", () => send([...input.files], "detached"));
  input.click();
});
""",
    ),
    "showpicker": (
        "showPicker() on a file input that is never in the document",
        '<button id="pick">Choose a photo</button>',
        _SEND
        + """
document.getElementById("pick").addEventListener("click", () => {
  const input = document.createElement("input");
  input.type = "file";
  input.addEventListener("change", () => send([...input.files], "showpicker"));
  input.showPicker();
});
""",
    ),
    "removed": (
        "A file input removed from the document once clicked",
        '<input type="file" id="picker">',
        _SEND
        + """
const input = document.getElementById("picker");
input.addEventListener("click", () => setTimeout(() => input.remove(), 0));
input.addEventListener("change", () => send([...input.files], "removed"));
""",
    ),
    "frame": (
        "A frame from another site",
        '<iframe id="frame" width="500" height="200"></iframe>',
        'document.getElementById("frame").src = `http://localhost:${location.port}/framed`;',
    ),
    "framed": (
        "The framed uploader",
        '<input type="file" id="picker">',
        _SEND
        + """
const input = document.getElementById("picker");
input.addEventListener("change", () => send([...input.files], "framed"));
""",
    ),
    "sandboxed": (
        "A sandboxed frame",
        '<iframe id="frame" width="500" height="200" sandbox="allow-scripts"></iframe>',
        r"""
document.getElementById("frame").srcdoc = `<input type="file" id="picker"><script>
  const input = document.getElementById("picker");
  input.addEventListener("change", () => {
    const form = new FormData();
    for (const f of input.files) form.append("photo", f, f.name);
    fetch("${location.origin}/upload/sandboxed", { method: "POST", body: form });
  });
<\/script>`;
""",
    ),
}
_PAGES.update(_PICKER_PAGES)

# Pages that read files in the less common ways real uploaders do (each uploads with fetch).
_READER_PAGES = {
    "focus": (
        "Reads the input when the window gets the focus back",
        '<input type="file" id="picker">',
        _SEND
        + """
// The cancel detection many uploaders use: once the picker closes the window gets the
// focus back; a moment later, an input that is still empty means "cancelled".
const input = document.getElementById("picker");
input.addEventListener("click", () => {
  window.addEventListener("focus", () => setTimeout(() => {
    const files = [...input.files];
    if (!files.length) document.getElementById("status").textContent = "cancelled";
    else send(files, "focus");
  }, 300), { once: true });
});
""",
    ),
    "poll": (
        "Polls the input on a timer started by the click",
        '<input type="file" id="picker">',
        _SEND
        + """
const input = document.getElementById("picker");
input.addEventListener("click", () => {
  const started = Date.now();
  const timer = setInterval(() => {
    if (input.files.length) {
      clearInterval(timer);
      send([...input.files], "poll");
    } else if (Date.now() - started > 120000) {
      clearInterval(timer);
    }
  }, 100);
});
""",
    ),
    "oninput": (
        "Reads the input on its input event",
        '<input type="file" id="picker">',
        _SEND
        + """
const input = document.getElementById("picker");
input.addEventListener("input", () => send([...input.files], "oninput"));
""",
    ),
    "entry": (
        "Drop read through webkitGetAsEntry()",
        '<div id="zone" style="width:400px;height:300px;border:3px dashed #888">Drop here</div>',
        _SEND
        + """
const zone = document.getElementById("zone");
zone.addEventListener("dragover", (e) => e.preventDefault());
zone.addEventListener("drop", (e) => {
  e.preventDefault();
  const entries = [...e.dataTransfer.items].map((item) => item.webkitGetAsEntry());
  const entry = entries[0];
  if (!entry || !entry.isFile) {
    document.getElementById("status").textContent = "no entry";
    return;
  }
  entry.file((f) => send([f], "entry"), () => {
    document.getElementById("status").textContent = "entry failed";
  });
});
""",
    ),
    "handle": (
        "Drop read through getAsFileSystemHandle()",
        '<div id="zone" style="width:400px;height:300px;border:3px dashed #888">Drop here</div>',
        _SEND
        + """
const zone = document.getElementById("zone");
zone.addEventListener("dragover", (e) => e.preventDefault());
zone.addEventListener("drop", async (e) => {
  e.preventDefault();
  // As file-selector (react-dropzone) does: every handle is asked for during the event.
  const handles = [...e.dataTransfer.items].filter((i) => i.kind === "file")
    .map((i) => i.getAsFileSystemHandle());
  const handle = await handles[0];
  if (!handle || handle.kind !== "file") {
    document.getElementById("status").textContent = "no handle";
    return;
  }
  send([await handle.getFile()], "handle");
});
""",
    ),
}
_PAGES.update(_READER_PAGES)

PAGES = ("fetch", "xhr", "drop", "paste")


@dataclass(frozen=True)
class Upload:
    """One file the site received: which page sent it, its name, MIME type and bytes."""

    page: str
    name: str
    content_type: str
    data: bytes


class UploadSite:
    """The test site; ``uploads`` lists every file received, in order."""

    def __init__(self) -> None:
        self.uploads: list[Upload] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.port = 0

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, page: str) -> str:
        return f"{self.origin}/{page}"

    def received(self, page: str | None = None) -> list[Upload]:
        """A copy of the uploads so far (of one page, if given)."""
        with self._lock:
            return [u for u in self.uploads if page is None or u.page == page]

    def clear(self) -> None:
        with self._lock:
            self.uploads.clear()

    def wait_for(self, page: str, count: int = 1, timeout_s: float = 60.0) -> list[Upload]:
        """Wait until ``page`` sent ``count`` files, then a moment for any extra one."""
        deadline = time.monotonic() + timeout_s
        while len(self.received(page)) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{page}: {len(self.received(page))} of {count} uploads")
            time.sleep(0.1)
        time.sleep(0.5)  # a second upload (an original sent as well) would arrive by now
        return self.received(page)

    def _record(self, upload: Upload) -> None:
        with self._lock:
            self.uploads.append(upload)

    async def _page(self, request: web.Request) -> web.Response:
        name = request.match_info["page"]
        if name in WIDGETS:
            return web.Response(text=widget_page(name), content_type="text/html")
        if name not in _PAGES:
            raise web.HTTPNotFound()
        title, body, script = _PAGES[name]
        html = _HEAD.format(title=title, body=body, script=script)
        return web.Response(text=html, content_type="text/html")

    async def _upload(self, request: web.Request) -> web.Response:
        page = request.match_info["page"]
        if request.content_type.startswith("multipart/"):
            form = await request.post()
            for field in form.values():  # every file, whatever its field's name
                if isinstance(field, web.FileField):
                    self._record(
                        Upload(page, field.filename, field.content_type, field.file.read())
                    )
        elif request.content_type == "application/json":
            body = await request.json()
            header, _, payload = body["dataUrl"].partition(",")
            self._record(Upload(page, body["name"], body["type"], base64.b64decode(payload)))
        else:
            name = unquote(request.headers.get("X-Filename", ""))
            self._record(Upload(page, name, request.content_type, await request.read()))
        return web.json_response({"ok": True, "success": True})  # Fine Uploader wants success

    async def _start(self) -> None:
        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_get("/{page}", self._page)
        if NODE_MODULES.is_dir():  # the widgets, once `make widgets` installed them
            app.router.add_static("/npm/", NODE_MODULES, follow_symlinks=False)
        app.router.add_post("/upload/{page}", self._upload)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    def start(self) -> UploadSite:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
