// Sites: host names, the default list of social sites, and the match patterns that
// turning a site on asks host access for. Pure functions, used by the service worker,
// the popup and the options page alike.

/** Major social sites offered in the popup and the options page; off until the user turns them on. */
export const SUGGESTED_SITES = Object.freeze([
  { host: "facebook.com", label: "Facebook" },
  { host: "instagram.com", label: "Instagram" },
  { host: "x.com", label: "X" },
  { host: "twitter.com", label: "X (twitter.com)" },
  { host: "linkedin.com", label: "LinkedIn" },
  { host: "reddit.com", label: "Reddit" },
  { host: "bsky.app", label: "Bluesky" },
  { host: "tiktok.com", label: "TikTok" },
  { host: "pinterest.com", label: "Pinterest" },
]);

const IPV4 = /^\d{1,3}(\.\d{1,3}){3}$/;

/** True for an IP literal ("127.0.0.1", "[::1]"), which has no subdomains. */
export function isIpLiteral(host) {
  return IPV4.test(host) || host.startsWith("[");
}

/**
 * The canonical site key for what a user typed or a page's URL: the host name in
 * lower case (punycode), without a leading "www." or a port. null when it is not an
 * http(s) host.
 */
export function normalizeSite(input) {
  if (typeof input !== "string") return null;
  const text = input.trim();
  if (!text) return null;
  let url;
  try {
    url = new URL(/^[a-z][a-z0-9+.-]*:\/\//i.test(text) ? text : `https://${text}`);
  } catch {
    return null;
  }
  if (url.protocol !== "http:" && url.protocol !== "https:") return null;
  const host = url.hostname.replace(/\.$/, "");
  if (!host) return null;
  return host.startsWith("www.") ? host.slice(4) : host;
}

/**
 * The configured site that covers `host` (the host itself or a parent domain, the
 * longest such), or null. `sites` is an iterable of site keys.
 */
export function siteCovering(host, sites) {
  let best = null;
  for (const site of sites) {
    const covers = host === site || (!isIpLiteral(site) && host.endsWith(`.${site}`));
    if (covers && (best === null || site.length > best.length)) best = site;
  }
  return best;
}

/**
 * Match patterns for a site: the host and its subdomains, any port, for `schemes`
 * (http and https by default; the popup asks only for the scheme of the page it is on).
 * Schemes are spelled out: "*://" would also cover ws/wss, which the manifest's optional
 * host permissions do not, and Chrome would refuse the request.
 */
export function originPatterns(site, schemes = ["https", "http"]) {
  const hosts = isIpLiteral(site) || !site.includes(".") ? [site] : [site, `*.${site}`];
  return hosts.flatMap((host) => schemes.map((scheme) => `${scheme}://${host}/*`));
}

/** The patterns of `site` that FaceCloak has host access to now (maybe none). */
export async function grantedPatterns(site) {
  const granted = [];
  for (const pattern of originPatterns(site)) {
    if (await chrome.permissions.contains({ origins: [pattern] })) granted.push(pattern);
  }
  return granted;
}

/**
 * Whether the daemon's settings can hold this site: it keeps host names with a dot
 * and refuses IP literals and single labels such as "localhost", which therefore
 * stay in the extension's own settings only.
 */
export function daemonAcceptsSite(site) {
  if (isIpLiteral(site) || !site.includes(".")) return false;
  const last = site.split(".").pop();
  return !/^\d+$/.test(last);
}

/** A readable label for a site key. */
export function siteLabel(site) {
  const known = SUGGESTED_SITES.find((s) => s.host === site);
  return known ? known.label : site;
}
