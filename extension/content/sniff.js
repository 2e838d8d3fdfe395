// Tells image files by their first bytes, not by their name or declared type: a photo named
// "photo", or sent as application/octet-stream, is still a photo. Runs in the extension's
// isolated world; classic script (content scripts are not modules).

(() => {
  if (globalThis.FaceCloakSniff) return;

  const HEAD_BYTES = 64;

  const ascii = (bytes, start, length) => String.fromCharCode(...bytes.subarray(start, start + length));
  const startsWith = (bytes, prefix, at = 0) => prefix.every((b, i) => bytes[at + i] === b);

  // ISO base media files (HEIF, HEIC, AVIF, and the raw files built on them): brands that
  // say "image", among the major brand and the compatible brands of the `ftyp` box.
  const BMFF_IMAGE_BRANDS = new Map([
    ["avif", "image/avif"], ["avis", "image/avif"],
    ["heic", "image/heic"], ["heix", "image/heic"], ["heim", "image/heic"], ["heis", "image/heic"],
    ["hevc", "image/heic"], ["hevx", "image/heic"], ["hevm", "image/heic"], ["hevs", "image/heic"],
    ["mif1", "image/heif"], ["mif2", "image/heif"], ["msf1", "image/heif"],
    ["avci", "image/heif"], ["jpgs", "image/heif"], ["crx ", "image/x-canon-cr3"],
  ]);

  function bmffImage(bytes) {
    if (ascii(bytes, 4, 4) !== "ftyp") return "";
    const size = new DataView(bytes.buffer, bytes.byteOffset).getUint32(0);
    const end = Math.min(bytes.length, Math.max(16, size));
    for (let at = 8; at + 4 <= end; at += at === 8 ? 8 : 4) {
      const type = BMFF_IMAGE_BRANDS.get(ascii(bytes, at, 4)); // major brand, then compatible ones
      if (type) return type;
    }
    return "";
  }

  function bmpImage(bytes) {
    if (!startsWith(bytes, [0x42, 0x4d]) || bytes.length < 18) return "";
    // The DIB header's size tells a real bitmap from text that starts with "BM".
    const header = new DataView(bytes.buffer, bytes.byteOffset).getUint32(14, true);
    return [12, 16, 40, 52, 56, 64, 108, 124].includes(header) ? "image/bmp" : "";
  }

  /** The image MIME type that the bytes `head` (Uint8Array) start with, or "". */
  function imageTypeOfBytes(bytes) {
    if (startsWith(bytes, [0xff, 0xd8, 0xff])) return "image/jpeg";
    if (startsWith(bytes, [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a])) return "image/png";
    if (ascii(bytes, 0, 6) === "GIF87a" || ascii(bytes, 0, 6) === "GIF89a") return "image/gif";
    if (ascii(bytes, 0, 4) === "RIFF" && ascii(bytes, 8, 4) === "WEBP") return "image/webp";
    // TIFF, little- or big-endian, classic or BigTIFF; most camera raw files (DNG, CR2,
    // NEF, ARW, ...) are TIFF inside; ORF and RW2 use their own magic numbers.
    if (startsWith(bytes, [0x49, 0x49, 0x2a, 0x00]) || startsWith(bytes, [0x4d, 0x4d, 0x00, 0x2a])) return "image/tiff";
    if (startsWith(bytes, [0x49, 0x49, 0x2b, 0x00]) || startsWith(bytes, [0x4d, 0x4d, 0x00, 0x2b])) return "image/tiff";
    if (ascii(bytes, 0, 4) === "IIRO" || ascii(bytes, 0, 4) === "IIRS" || startsWith(bytes, [0x49, 0x49, 0x55, 0x00])) {
      return "image/x-raw";
    }
    if (ascii(bytes, 0, 15) === "FUJIFILMCCD-RAW") return "image/x-fuji-raf";
    const bmff = bmffImage(bytes);
    if (bmff) return bmff;
    // JPEG XL (codestream or container), JPEG 2000 (container or codestream).
    if (startsWith(bytes, [0xff, 0x0a])) return "image/jxl";
    if (startsWith(bytes, [0, 0, 0, 0x0c, 0x4a, 0x58, 0x4c, 0x20, 0x0d, 0x0a, 0x87, 0x0a])) return "image/jxl";
    if (startsWith(bytes, [0, 0, 0, 0x0c, 0x6a, 0x50, 0x20, 0x20, 0x0d, 0x0a, 0x87, 0x0a])) return "image/jp2";
    if (startsWith(bytes, [0xff, 0x4f, 0xff, 0x51])) return "image/jp2";
    return bmpImage(bytes);
  }

  /** Resolves to the image MIME type `file`'s first bytes show, or "" (also if unreadable). */
  async function imageTypeOf(file) {
    try {
      return imageTypeOfBytes(new Uint8Array(await file.slice(0, HEAD_BYTES).arrayBuffer()));
    } catch {
      return "";
    }
  }

  globalThis.FaceCloakSniff = Object.freeze({ imageTypeOf, imageTypeOfBytes });
})();
