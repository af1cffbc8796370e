// Shared by the node's pages: DOM building from text nodes only (no markup from strings), JSON requests.
'use strict';

/** An element with attributes and children; strings become text nodes, null/false children are skipped. */
function el(tag, attributes, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith('on')) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? '' : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

/** GET or POST JSON on the node (same origin, the browser sends the login); throws with the node's error text. */
async function requestJson(url, options) {
  const response = await fetch(url, Object.assign({ credentials: 'same-origin', cache: 'no-store' }, options || {}));
  let body = null;
  try { body = await response.json(); } catch (error) { body = null; }
  if (!response.ok) {
    const message = body && body.error ? body.error : `HTTP ${response.status}`;
    const failure = new Error(message);
    failure.status = response.status;
    throw failure;
  }
  return body;
}

/** Paths on the node (absolute: Orthanc serves /abscess-node/ui and /abscess-node/ui/ alike). */
const NODE = {
  api: (path) => `/abscess-node/${path}`,
  ohif: (studyUid) => `/ohif/viewer?StudyInstanceUIDs=${encodeURIComponent(studyUid)}`,
  explorer: (orthancStudyId) => `/app/explorer.html#study?uuid=${encodeURIComponent(orthancStudyId)}`,
  gallery: (orthancStudyId) => `/abscess-node/ui/similar.html?study=${encodeURIComponent(orthancStudyId)}`,
};

function seconds(value) {
  return value === null || value === undefined ? '' : `${Number(value).toFixed(value < 10 ? 2 : 1)} s`;
}

function shortUid(uid) {
  return uid && uid.length > 28 ? `${uid.slice(0, 12)}…${uid.slice(-12)}` : (uid || '');
}

function localTime(iso) {
  return iso ? new Date(iso).toLocaleString() : '';
}
