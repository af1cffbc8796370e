// Lay out the folder that Orthanc's ServeFolders plugin serves as /ohif/ (see orthanc.json).
//
// The prebuilt OHIF dist in node_modules/@ohif/app/dist is built for the web root "/". Nothing of
// OHIF is rebuilt here: every file of the dist is linked as it is, except
//   - index.html: the root "/" of its URLs becomes the mount point "/ohif/";
//   - the bundles whose webpack public path is the literal "/": it becomes "/ohif/", so that lazy
//     chunks, web workers, codecs (wasm) and images load from the mount point;
//   - the stylesheets that load fonts from "/": from "/ohif/";
//   - app-config.js: ours (viewer/app-config.js), pointing at Orthanc's DICOMweb on the same origin;
//   - one copy of index.html per client-side route OHIF opens directly ("viewer", "segmentation"):
//     ServeFolders has no fallback to index.html, so each route is a file (served as text/html via
//     the "" extension of ServeFolders.Extensions in orthanc.json).
//
// Usage: node prepare.mjs [outDir]   (default: viewer/www next to this script)

import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const MOUNT = '/ohif/';
const ROUTES = ['viewer', 'segmentation'];
const DIST = path.join(HERE, 'node_modules', '@ohif', 'app', 'dist');
const OUT = path.resolve(process.argv[2] || path.join(HERE, 'www'));
const PUBLIC_PATH = '__webpack_require__.p = "/";';

function fail(message) {
  console.error(`prepare.mjs: ${message}`);
  process.exit(1);
}

function rebaseIndex(html) {
  const rebased = html
    .replaceAll('window.PUBLIC_URL="/"', `window.PUBLIC_URL="${MOUNT}"`)
    .replaceAll(/(href|src)="\/(?!\/)/g, `$1="${MOUNT}`);
  if (!rebased.includes(`window.PUBLIC_URL="${MOUNT}"`)) {
    fail('index.html of this @ohif/app version does not set window.PUBLIC_URL="/"');
  }
  // /ohif/index.html is not an OHIF route: show it as the study list (/ohif/).
  const redirect = `<script>if(location.pathname==="${MOUNT}index.html")` +
    `history.replaceState(null,"","${MOUNT}"+location.search+location.hash)</script>`;
  return rebased.replace('<head>', `<head>${redirect}`);
}

if (!fs.existsSync(path.join(DIST, 'index.html'))) {
  fail(`${DIST} is missing: run \`npm ci\` in viewer/ (make viewer)`);
}
const version = JSON.parse(fs.readFileSync(path.join(DIST, '..', 'package.json'), 'utf8')).version;

fs.rmSync(OUT, { recursive: true, force: true });
fs.mkdirSync(OUT, { recursive: true });

let patchedBundles = 0;
for (const entry of fs.readdirSync(DIST, { withFileTypes: true })) {
  const source = path.join(DIST, entry.name);
  const target = path.join(OUT, entry.name);
  if (entry.name === 'index.html' || entry.name === 'app-config.js') {
    continue;
  }
  if (entry.isFile() && entry.name.endsWith('.js')) {
    const text = fs.readFileSync(source, 'utf8');
    if (text.includes(PUBLIC_PATH)) {
      fs.writeFileSync(target, text.replaceAll(PUBLIC_PATH, `__webpack_require__.p = "${MOUNT}";`));
      patchedBundles += 1;
      continue;
    }
  }
  if (entry.isFile() && entry.name.endsWith('.css')) {
    const text = fs.readFileSync(source, 'utf8');
    if (/url\(\/(?!\/)/.test(text)) {  // fonts referenced from the web root
      fs.writeFileSync(target, text.replaceAll(/url\(\/(?!\/)/g, `url(${MOUNT}`));
      continue;
    }
  }
  fs.symlinkSync(path.relative(OUT, source), target);
}
if (patchedBundles === 0) {
  fail('no bundle sets the webpack public path "/": unexpected @ohif/app dist');
}

const index = rebaseIndex(fs.readFileSync(path.join(DIST, 'index.html'), 'utf8'));
fs.writeFileSync(path.join(OUT, 'index.html'), index);
for (const route of ROUTES) {
  fs.writeFileSync(path.join(OUT, route), index);
}
fs.copyFileSync(path.join(HERE, 'app-config.js'), path.join(OUT, 'app-config.js'));
fs.writeFileSync(path.join(OUT, 'ohif-version.json'), JSON.stringify({ '@ohif/app': version }) + '\n');
console.log(`OHIF ${version} laid out in ${path.relative(process.cwd(), OUT) || '.'} ` +
            `(${patchedBundles} bundles rebased to ${MOUNT}); served by Orthanc at ${MOUNT}`);
