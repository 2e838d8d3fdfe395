// HTTP client of the FaceCloak daemon (../../backend). The only code that talks to it;
// used by the service worker only, so the pairing token never reaches a page.

/**
 * Why protecting failed, as the page and the popup explain it. `code` is one of:
 * unreachable (no daemon on the port), unpaired (no or refused token), busy (queue
 * full), timeout (past the time limit), rejected (the daemon could not take this image),
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
  /** `port`: the daemon's TCP port on 127.0.0.1; `token`: the pairing token or null. */
  constructor({ port, token = null, fetchTimeoutMs = 15000 }) {
    this.base = `http://127.0.0.1:${port}`;
    this.token = token;
    this.fetchTimeoutMs = fetchTimeoutMs;
  }

  async #request(path, { method = "GET", body, headers = {}, auth = true, signal } = {}) {
    if (auth && !this.token) {
      throw new DaemonError("unpaired", "FaceCloak is not paired with the FaceCloak service yet.");
    }
    const allHeaders = { ...headers };
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

  /** GET /v1/health: {status, version, device, models, queue}. No token needed. */
  async health() {
    return (await this.#request("/v1/health", { auth: false })).json();
  }

  /** POST /v1/pair: exchanges the code shown by `facecloak pair` for a token. */
  async pair(code, origin) {
    const response = await this.#request("/v1/pair", {
      method: "POST",
      auth: false,
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ code, origin }),
    });
    const { token } = await response.json();
    if (typeof token !== "string" || !token) {
      throw new DaemonError("failed", "The FaceCloak service answered the pairing without a token.");
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
  async submitJob(bytes, mime, { site, preset, signal } = {}) {
    const query = new URLSearchParams();
    if (site) query.set("site", site);
    if (preset) query.set("preset", preset);
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
