// HTTP client of the FaceCloak daemon (../../backend). The only code that talks to it;
// used by the service worker only, so the pairing token never reaches a page.
//
// Before any request that carries the token (and with it a photo or settings), the client
// makes whatever listens on 127.0.0.1:<port> prove that it is the daemon this browser
// paired with (POST /v1/proof, see backend/proof.py): a program that took the port while
// the daemon was stopped gets neither the token nor a photo.

const encoder = new TextEncoder();
const PROOF_KEY_LABEL = encoder.encode("facecloak proof key v1");
const KEY_ID_LABEL = encoder.encode("facecloak proof key id v1");
const PROOF_LABEL = encoder.encode("facecloak daemon proof v1");

function b64url(bytes) {
  let binary = "";
  for (const byte of bytes) binary += String.fromCharCode(byte);
  return btoa(binary).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

function unb64url(text) {
  if (typeof text !== "string" || !/^[A-Za-z0-9_-]*$/.test(text) || text.length % 4 === 1) return null;
  const binary = atob(text.replace(/-/g, "+").replace(/_/g, "/") + "=".repeat((4 - (text.length % 4)) % 4));
  return Uint8Array.from(binary, (c) => c.charCodeAt(0));
}

function concat(...parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const part of parts) {
    out.set(part, at);
    at += part.length;
  }
  return out;
}

const hex = (bytes) => Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");

async function hmacKey(raw) {
  return crypto.subtle.importKey("raw", raw, { name: "HMAC", hash: "SHA-256" }, false, ["sign", "verify"]);
}

/**
 * The proof key of a pairing token and its public id, as backend/proof.py derives them:
 * key = HMAC-SHA256(token, label), id = first 32 hex digits of HMAC-SHA256(key, label).
 */
export async function proofKeyOf(token) {
  const raw = new Uint8Array(await crypto.subtle.sign("HMAC", await hmacKey(encoder.encode(token)), PROOF_KEY_LABEL));
  const key = await hmacKey(raw);
  const id = hex(new Uint8Array(await crypto.subtle.sign("HMAC", key, KEY_ID_LABEL))).slice(0, 32);
  return { key, id };
}

/**
 * Why protecting failed, as the page and the popup explain it. `code` is one of:
 * unreachable (no daemon on the port), unpaired (no or refused token), unverified
 * (something on the port could not prove it is the paired daemon), busy (queue full),
 * timeout (past the time limit), rejected (the daemon could not take this image),
 * failed (any other error).
 */
export class DaemonError extends Error {
  constructor(code, message, status = 0) {
    super(message);
    this.name = "DaemonError";
    this.code = code;
    this.status = status;
  }
}

function codeForStatus(status, errorCode) {
  if (status === 401) return "unpaired";
  if (status === 403) return "unpaired"; // an origin the daemon does not know: pair again
  if (status === 429) return errorCode === "rate_limited" ? "rejected" : "busy";
  if (status === 400 || status === 413 || status === 415) return "rejected";
  if (status === 504) return "timeout";
  return "failed";
}

export class DaemonClient {
  /**
   * `port`: the daemon's TCP port on 127.0.0.1; `token`: the pairing token or null;
   * `origin`: this extension's origin, named in X-FaceCloak-Origin (Chromium sends no
   * Origin on the extension's GET requests, and the daemon binds the token to it).
   */
  constructor({ port, token = null, origin = null, fetchTimeoutMs = 15000 }) {
    this.port = Number(port);
    this.base = `http://127.0.0.1:${port}`;
    this.token = token;
    this.origin = origin;
    this.fetchTimeoutMs = fetchTimeoutMs;
    this.proofKey = token ? proofKeyOf(token) : null;
  }

  /**
   * Make the program on the port prove it holds this pairing's proof key: a fresh
   * challenge, its HMAC checked here. Throws DaemonError ("unverified", "unpaired" or
   * "unreachable") unless it does; sends nothing secret.
   */
  async verify({ signal } = {}) {
    const { key, id } = await this.proofKey;
    const challenge = crypto.getRandomValues(new Uint8Array(32));
    const response = await this.#request("/v1/proof", {
      method: "POST",
      auth: false,
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ key_id: id, challenge: b64url(challenge) }),
      signal,
      verifyErrors: true,
    });
    let answer = null;
    try {
      answer = await response.json();
    } catch {
      // not JSON: not the daemon
    }
    const nonce = unb64url(answer?.nonce);
    const proof = unb64url(answer?.proof);
    const port = new Uint8Array([this.port >> 8, this.port & 0xff]);
    const valid =
      nonce?.length === 32 &&
      proof?.length === 32 &&
      (await crypto.subtle.verify("HMAC", key, proof, concat(PROOF_LABEL, challenge, nonce, port)));
    if (!valid) throw this.#impostor();
  }

  #impostor() {
    return new DaemonError(
      "unverified",
      `The program answering on ${this.base} could not prove it is the FaceCloak service this browser paired with.`,
    );
  }

  async #request(path, { method = "GET", body, headers = {}, auth = true, signal, verifyErrors = false } = {}) {
    if (auth && !this.token) {
      throw new DaemonError("unpaired", "FaceCloak is not paired with the FaceCloak service yet.");
    }
    // Nothing secret leaves before the program on the port has proven who it is.
    if (auth) await this.verify({ signal });
    const allHeaders = { ...headers };
    if (this.origin) allHeaders["X-FaceCloak-Origin"] = this.origin;
    if (auth) allHeaders.Authorization = `Bearer ${this.token}`;
    const timeout = AbortSignal.timeout(this.fetchTimeoutMs);
    let response;
    try {
      response = await fetch(this.base + path, {
        method,
        body,
        headers: allHeaders,
        cache: "no-store",
        credentials: "omit",
        signal: signal ? AbortSignal.any([signal, timeout]) : timeout,
      });
    } catch (err) {
      if (signal?.aborted) throw err;
      throw new DaemonError(
        "unreachable",
        `The FaceCloak service is not answering on ${this.base}.`,
      );
    }
    if (!response.ok && verifyErrors && response.status !== 401 && response.status !== 403) {
      throw this.#impostor(); // the daemon answers a proof 200, 401 or 403, nothing else
    }
    if (!response.ok) {
      let payload = {};
      try {
        payload = await response.json();
      } catch {
        // not JSON: keep the status line
      }
      const message = payload.message || `HTTP ${response.status} ${response.statusText}`;
      throw new DaemonError(codeForStatus(response.status, payload.error), message, response.status);
    }
    return response;
  }

  /** GET /v1/health: {status, version, device, models, presets, queue}. No token needed. */
  async health() {
    return (await this.#request("/v1/health", { auth: false })).json();
  }

  /**
   * POST /v1/pair: exchanges the code shown by `facecloak pair` for a token. The daemon's
   * answer names the token's proof key; a daemon that cannot prove itself is refused.
   */
  async pair(code, origin) {
    const response = await this.#request("/v1/pair", {
      method: "POST",
      auth: false,
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ code, origin }),
    });
    const { token, key_id: keyId } = await response.json();
    if (typeof token !== "string" || !token) {
      throw new DaemonError("failed", "The FaceCloak service answered the pairing without a token.");
    }
    if (keyId !== (await proofKeyOf(token)).id) {
      throw new DaemonError(
        "failed",
        "This FaceCloak service cannot prove who it is (it is older than this extension): update it, then pair again.",
      );
    }
    return token;
  }

  /** GET /v1/settings: {enabled, preset, privacy, sites}. */
  async getSettings() {
    return (await this.#request("/v1/settings")).json();
  }

  /** PUT /v1/settings with any subset of the keys. */
  async putSettings(patch) {
    const response = await this.#request("/v1/settings", {
      method: "PUT",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(patch),
    });
    return response.json();
  }

  /** POST /v1/jobs: queues `bytes` (ArrayBuffer, an image of type `mime`); returns the job id. */
  async submitJob(bytes, mime, { site, preset, collection, signal } = {}) {
    const query = new URLSearchParams();
    if (site) query.set("site", site);
    if (preset) query.set("preset", preset);
    if (collection) {
      query.set("collection", collection.id);
      query.set("collection_size", String(collection.size));
    }
    const response = await this.#request(`/v1/jobs?${query}`, {
      method: "POST",
      headers: { "Content-Type": mime || "application/octet-stream" },
      body: bytes,
      signal,
    });
    const { id } = await response.json();
    return id;
  }

  /** GET /v1/jobs/{id}: {state, progress (0..1), faces, error}. */
  async jobStatus(id, { signal } = {}) {
    return (await this.#request(`/v1/jobs/${encodeURIComponent(id)}`, { signal })).json();
  }

  /**
   * GET /v1/jobs/{id}/preview: {id, preset, faces: [{before, after, models, matched}]},
   * the crops as JPEG data URLs. Only this token's latest job has one.
   */
  async jobPreview(id, { signal } = {}) {
    return (await this.#request(`/v1/jobs/${encodeURIComponent(id)}/preview`, { signal })).json();
  }

  /** GET /v1/jobs/{id}/result: {bytes (ArrayBuffer), mime, faces, seconds}. */
  async jobResult(id, { signal } = {}) {
    const response = await this.#request(`/v1/jobs/${encodeURIComponent(id)}/result`, { signal });
    const faces = Number(response.headers.get("X-FaceCloak-Faces"));
    const seconds = Number(response.headers.get("X-FaceCloak-Seconds"));
    return {
      bytes: await response.arrayBuffer(),
      mime: (response.headers.get("Content-Type") || "").split(";")[0].trim(),
      faces: Number.isFinite(faces) ? faces : null,
      seconds: Number.isFinite(seconds) ? seconds : null,
    };
  }
}
