"""Pages of the test site with real upload widgets from npm, loaded from their published
browser bundles (``tests/e2e/widgets``, installed with ``npm ci`` by ``make widgets``).

Each page shows ``#status`` "uploaded N" once the widget reports a finished upload (its
own success event), and posts to ``/upload/<widget>``. ``WIDGETS`` says, per widget, how
a user hands it a photo (``ways``), where to click or drop, and what its own interface
shows for a file (name, finished state, preview) and while something is dragged over it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

WIDGET_DIR = Path(__file__).resolve().parent / "widgets"
NODE_MODULES = WIDGET_DIR / "node_modules"


@dataclass(frozen=True)
class Widget:
    name: str
    package: str  # the npm package the bundle comes from
    ways: tuple[str, ...]  # "pick", "drop", "paste"
    head: str  # stylesheets and the bundle
    body: str
    script: str  # sets the widget up; calls done(ok) when it reports an upload
    browse: str  # selector to click for the picker
    drop: str  # selector of the drop area
    paste_focus: str  # selector to focus before pasting
    item_name: str  # selector of the file's name in the widget's list
    finished: str  # selector present once the widget shows the upload as finished
    preview: str | None  # selector of a preview image with a source (None: no previews)
    dragging: str  # selector present while the widget shows its drag-over look


def _bundle(path: str) -> str:
    return f'<script src="/npm/{path}"></script>'


def _style(path: str) -> str:
    return f'<link rel="stylesheet" href="/npm/{path}">'


def _fine_uploader_template() -> str:
    path = NODE_MODULES / "fine-uploader/fine-uploader/templates/default.html"
    return path.read_text() if path.exists() else ""


WIDGETS: dict[str, Widget] = {
    w.name: w
    for w in (
        Widget(
            name="dropzone",
            package="dropzone",
            ways=("pick", "drop", "paste"),
            head=_style("dropzone/dist/dropzone.css") + _bundle("dropzone/dist/dropzone-min.js"),
            body='<form id="dz" class="dropzone" style="min-height:260px"></form>',
            script="""
Dropzone.autoDiscover = false;
const dz = new Dropzone("#dz", { url: "/upload/dropzone", paramName: "photo" });
dz.on("success", () => done(true));
dz.on("error", () => done(false));
// Dropzone reads pastes with its own paste(), which the page wires to the document.
document.addEventListener("paste", (e) => dz.paste(e));
""",
            browse="#dz",
            drop="#dz",
            paste_focus="h1",
            item_name=".dz-preview .dz-filename span",
            finished=".dz-preview.dz-success.dz-complete",
            preview=".dz-preview .dz-image img[src^='data:']",
            dragging="#dz.dz-drag-hover",
        ),
        Widget(
            name="filepond",
            package="filepond",
            ways=("pick", "drop", "paste"),
            head=_style("filepond/dist/filepond.min.css")
            + _bundle("filepond/dist/filepond.min.js"),
            body='<input type="file" id="fp" name="photo">',
            script="""
FilePond.create(document.getElementById("fp"), {
  server: { process: "/upload/filepond" },
  allowPaste: true,
  onprocessfile: (error) => done(!error),
});
""",
            browse=".filepond--label-action",
            drop=".filepond--drop-label",
            paste_focus="h1",
            item_name=".filepond--file-info-main",
            finished=".filepond--item[data-filepond-item-state='processing-complete']",
            preview=None,  # previews are a separate plugin
            dragging=".filepond--root[data-hopper-state='drag-over']",
        ),
        Widget(
            name="uppy",
            package="uppy",
            ways=("pick", "drop", "paste"),
            head=_style("uppy/dist/uppy.min.css") + _bundle("uppy/dist/uppy.min.js"),
            body='<div id="uppy"></div>',
            script="""
const uppy = new Uppy.Uppy({ autoProceed: true })
  .use(Uppy.Dashboard, { inline: true, target: "#uppy", height: 380, width: 600,
                         proudlyDisplayPoweredByUppy: false })
  .use(Uppy.XHRUpload, { endpoint: "/upload/uppy", fieldName: "photo" });
uppy.on("upload-success", () => done(true));
uppy.on("upload-error", () => done(false));
""",
            browse=".uppy-Dashboard-browse",
            drop=".uppy-Dashboard-inner",
            paste_focus=".uppy-Dashboard-browse",  # focus inside the dashboard, no click
            item_name=".uppy-Dashboard-Item-name",
            finished=".uppy-Dashboard-Item.is-complete",
            preview=".uppy-Dashboard-Item-previewImg[src]",
            dragging=".uppy-Dashboard-inner.uppy-Dashboard--isDraggingOver",
        ),
        Widget(
            name="fineuploader",
            package="fine-uploader",
            ways=("pick", "drop", "paste"),
            head=_style("fine-uploader/fine-uploader/fine-uploader-new.min.css")
            + _bundle("fine-uploader/fine-uploader/fine-uploader.min.js"),
            body='<div id="fu" style="width:600px"></div>',
            script="""
new qq.FineUploader({
  element: document.getElementById("fu"),
  request: { endpoint: "/upload/fineuploader", inputName: "photo" },
  paste: { targetElement: document },
  callbacks: { onComplete: (id, name, response) => done(Boolean(response && response.success)) },
});
""",
            browse=".qq-upload-button input[type=file]",
            drop=".qq-uploader",
            paste_focus="h1",
            item_name=".qq-upload-list .qq-upload-file",
            finished=".qq-upload-list li.qq-upload-success",
            preview=None,  # previews need its gallery template
            dragging=".qq-upload-drop-area[qq-hide-dropzone]:not([style*='display: none'])",
        ),
    )
}

_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>{title}</title>{head}</head>
<body><h1>{title}</h1>{template}{body}<p id="status">ready</p>
<script>
let uploaded = 0;
function done(ok) {{
  uploaded += ok ? 1 : 0;
  document.getElementById("status").textContent = ok ? "uploaded " + uploaded : "upload failed";
}}
{script}
</script></body></html>"""


def widget_page(name: str) -> str:
    """The HTML of the page with widget ``name``."""
    widget = WIDGETS[name]
    template = _fine_uploader_template() if name == "fineuploader" else ""
    title = f"{widget.package} (npm)"
    return _PAGE.format(
        title=title, head=widget.head, template=template, body=widget.body, script=widget.script
    )


def installed_versions() -> dict[str, str]:
    """The installed version of each widget's package ({} for those not installed)."""
    out = {}
    for widget in WIDGETS.values():
        meta = NODE_MODULES / widget.package / "package.json"
        if meta.exists():
            out[widget.package] = json.loads(meta.read_text())["version"]
    return out
