# ruff: noqa: E501 -- the page scripts below are JavaScript in strings
"""What a page's own script can see of FaceCloak on a site that is on, before any upload.

The page guard wraps functions in the page's world (``click``, ``showPicker``,
``dispatchEvent``, the DOM insertion methods, ``window.open``, ``Function.prototype.toString``).
From the page, each must look exactly like the browser's own: ``toString`` (also asked
from another frame's ``toString``), ``name``, ``length``, own keys, constructor or not, and
the flags of its property. The baseline is the same page on a site that is off
(``localhost``: there the guard stands down at once), in the same browser. Neither page
may have a FaceCloak global or DOM node; the only difference allowed between them is the
File System Access pickers, removed on purpose (see extension/README.md).
"""

from __future__ import annotations

import pytest
from uploads import PHOTO

pytestmark = pytest.mark.browser

# [owner expression, property, which part of the descriptor holds the function]
WRAPPED = [
    ["HTMLElement.prototype", "click", "value"],
    ["HTMLInputElement.prototype", "showPicker", "value"],
    ["EventTarget.prototype", "dispatchEvent", "value"],
    ["Function.prototype", "toString", "value"],
    ["Node.prototype", "appendChild", "value"],
    ["Node.prototype", "insertBefore", "value"],
    ["Node.prototype", "replaceChild", "value"],
    ["Element.prototype", "append", "value"],
    ["Element.prototype", "prepend", "value"],
    ["Element.prototype", "before", "value"],
    ["Element.prototype", "after", "value"],
    ["Element.prototype", "replaceWith", "value"],
    ["Element.prototype", "replaceChildren", "value"],
    ["Element.prototype", "insertAdjacentElement", "value"],
    ["Element.prototype", "insertAdjacentHTML", "value"],
    ["CharacterData.prototype", "after", "value"],
    ["DocumentFragment.prototype", "append", "value"],
    ["Document.prototype", "write", "value"],
    ["Document.prototype", "writeln", "value"],
    ["Range.prototype", "insertNode", "value"],
    ["Element.prototype", "innerHTML", "set"],
    ["Element.prototype", "outerHTML", "set"],
    ["ShadowRoot.prototype", "innerHTML", "set"],
    ["window", "open", "value"],
]

# Runs as the page's own script. Returns, for each function, everything a script can ask
# of it without calling it, plus what the page's globals and DOM show.
LOOK = """(wrapped) => {
  const toString = Function.prototype.toString;
  const frame = document.createElement("iframe");
  document.body.appendChild(frame);  // a same-origin world of the page's own
  const otherToString = frame.contentWindow.Function.prototype.toString;
  const look = (fn) => {
    let constructible = true;
    try { Reflect.construct(function () {}, [], fn); } catch { constructible = false; }
    let caller;
    try { caller = String(fn.caller); } catch (e) { caller = e.constructor.name; }
    return {
      toString: toString.call(fn),
      fromOtherFrame: otherToString.call(fn),
      string: String(fn),
      name: fn.name,
      length: fn.length,
      ownKeys: Reflect.ownKeys(fn).map(String),
      nameFlags: JSON.stringify(Object.getOwnPropertyDescriptor(fn, "name")),
      lengthFlags: JSON.stringify(Object.getOwnPropertyDescriptor(fn, "length")),
      hasPrototype: "prototype" in fn,
      constructible,
      caller,
    };
  };
  const functions = {};
  for (const [ownerName, property, part] of wrapped) {
    const owner = eval(ownerName);
    const d = Object.getOwnPropertyDescriptor(owner, property);
    const fn = d[part];
    functions[`${ownerName}.${property}`] = {
      ...look(fn),
      flags: JSON.stringify({ writable: d.writable, enumerable: d.enumerable, configurable: d.configurable,
                              value: typeof d.value, get: typeof d.get, set: typeof d.set }),
      position: Reflect.ownKeys(owner).map(String).indexOf(property),
      frameCopy: look(Object.getOwnPropertyDescriptor(eval("frame.contentWindow." + ownerName), property)[part]),
    };
  }
  frame.remove();
  let stack = "";
  try { HTMLElement.prototype.click.call({}); } catch (e) { stack = String(e.stack); }
  const globals = [...Object.getOwnPropertyNames(window), ...Object.getOwnPropertyNames(Window.prototype)];
  const html = document.documentElement.outerHTML;
  return {
    functions,
    globals,
    facecloakGlobals: globals.filter((n) => /cloak/i.test(n)),
    facecloakNodes: [...document.querySelectorAll("*")]
      .filter((e) => /facecloak/i.test(e.localName + " " + e.id + " " + e.className)).length,
    notice: document.getElementById("facecloak-notice") !== null,
    htmlMentions: /facecloak/i.test(html),
    stack,
  };
}"""


@pytest.fixture
def views(extension, site, page):
    """What the same page's script sees on a site that is on, and on one that is off."""
    page.goto(site.url("fetch"))
    extension.set_site(page, True)  # 127.0.0.1 on; localhost stays off
    on = page.evaluate(LOOK, WRAPPED)
    off_page = extension.context.new_page()
    try:
        off_page.goto(site.url("fetch").replace("127.0.0.1", "localhost"))
        off = off_page.evaluate(LOOK, WRAPPED)
    finally:
        off_page.close()
    return on, off


def test_wrapped_functions_look_like_the_browsers_own(views):
    on, off = views
    for owner, name, part in WRAPPED:
        key = f"{owner}.{name}"
        theirs, ours = off["functions"][key], on["functions"][key]
        shown = f"set {name}" if part == "set" else name
        assert theirs["toString"] == f"function {shown}() {{ [native code] }}", key  # the baseline
        assert ours == theirs, key


def test_no_facecloak_global_or_node_before_an_upload(views):
    on, off = views
    assert on["facecloakGlobals"] == [] and off["facecloakGlobals"] == []
    assert on["facecloakNodes"] == 0 and not on["notice"] and not on["htmlMentions"]
    assert off["facecloakNodes"] == 0 and not off["notice"] and not off["htmlMentions"]
    # Removed on purpose on a site that is on (files picked there reach the page unseen).
    assert set(off["globals"]) - set(on["globals"]) <= {"showOpenFilePicker", "showDirectoryPicker"}
    assert set(on["globals"]) - set(off["globals"]) == set()


def test_a_site_that_is_off_keeps_the_browsers_own_functions(views):
    """Nothing of the guard's is in the page's world there: no frame of its in a stack."""
    on, off = views
    assert "chrome-extension://" not in off["stack"], off["stack"]
    # On a site that is on, a wrapper's frame shows in the stack of an error it passes on.
    assert "chrome-extension://" in on["stack"]


def test_a_site_that_is_off_gets_its_own_picker_from_click_on_a_detached_input(
    extension, site, page, photos_dir
):
    """Pickers no event shows work as usual on a site that is off (while another is on)."""
    photo = photos_dir / PHOTO
    page.goto(site.url("fetch"))
    extension.set_site(page, True)  # 127.0.0.1 on; localhost stays off
    page.goto(site.url("detached").replace("127.0.0.1", "localhost"))
    site.clear()
    with page.expect_file_chooser(timeout=10_000) as chooser:
        page.click("#pick")
    chooser.value.set_files(str(photo))
    site.wait_for("detached", timeout_s=30)
    assert site.received("detached")[0].data == photo.read_bytes()  # the site is off


CLICK = """() => {
  const button = document.createElement("button");
  button.id = "presence-pick";
  button.textContent = "pick";
  document.body.append(button);
  button.addEventListener("click", () => {
    const input = document.createElement("input");
    input.type = "file";  // never in the document: the guard's case
    input.addEventListener("click", (e) => (window.presenceClick = [e.constructor.name, e.view === window, e.pointerId,
      e.pointerType, e.detail, e.bubbles, e.composed, e.cancelable, e.isTrusted, e.button]));
    input.click();
  });
}"""


def test_the_click_of_click_on_a_detached_input_looks_like_the_browsers_own(extension, site, page):
    """Only its being cancelled already tells it apart (see extension/README.md)."""
    page.goto(site.url("fetch"))
    extension.set_site(page, True)  # 127.0.0.1 on; localhost stays off
    seen = {}
    for name, url in (
        ("on", site.url("fetch")),
        ("off", site.url("fetch").replace("127.0.0.1", "localhost")),
    ):
        page.goto(url)
        page.evaluate(CLICK)
        with page.expect_file_chooser(timeout=10_000):
            page.click("#presence-pick")
        seen[name] = page.evaluate("window.presenceClick")
    assert seen["off"][0] == "PointerEvent"
    assert seen["on"] == seen["off"]
