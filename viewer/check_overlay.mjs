// Headless-Chromium driver of tests/test_viewer.py: open a study in the node's OHIF, load a SEG as
// an overlay, and screenshot chosen slices with the overlay shown and hidden.
//
//   node check_overlay.mjs job.json
//
// job.json: {url, credentials: {username, password}, segDescription, outDir,
//            slices: [{name, sopInstanceUid, points: {key: [x, y, z]}}]}
// (points in patient coordinates, mm). Prints one JSON object on stdout: what the page listed,
// the segmentations OHIF holds, and per slice the screenshots and the page coordinates of the
// points. The pixel checks are the test's (Python); this script only drives the browser.
// Uses Debian's /usr/bin/chromium (CHROMIUM overrides it); never downloads a browser.

import path from 'node:path';
import { launchChromium, logger, readJob, runSteps } from './driver.mjs';

const job = readJob();
const STEP_TIMEOUT = Number(job.stepTimeoutMs || 90000);
const log = logger('check_overlay');
const browser = await launchChromium();

const consoleErrors = [];
const httpErrors = [];
const result = { consoleErrors, httpErrors };
await runSteps(browser, result, async () => {
  // the node answers HTTP only to authenticated users: log in as a radiologist's browser would
  const page = await browser.newPage({ viewport: { width: 1400, height: 900 }, deviceScaleFactor: 1,
                                       httpCredentials: job.credentials });
  page.setDefaultTimeout(STEP_TIMEOUT);
  page.on('console', (message) => { if (message.type() === 'error') consoleErrors.push(message.text().slice(0, 500)); });
  page.on('response', (response) => { if (response.status() >= 400) httpErrors.push(`${response.status()} ${response.url()}`); });

  log('open', job.url);
  await page.goto(job.url, { waitUntil: 'load' });
  // The study browser lists the series of the study: wait for our SEG there.
  const segItem = page.getByText(job.segDescription, { exact: false }).first();
  await segItem.waitFor({ state: 'visible' });
  // The CT is on screen once the viewport holds its image stack.
  await page.waitForFunction(() => {
    const engine = window.cornerstone?.getRenderingEngines?.()[0];
    const viewport = engine?.getViewports?.()[0];
    return Boolean(viewport && viewport.getImageIds?.().length);
  });
  // OHIF's first-visit tour (a modal over the whole page) shows shortly after: dismiss it.
  const skipTour = page.getByText('Skip all', { exact: true });
  try {
    await skipTour.waitFor({ state: 'visible', timeout: 20000 });
    await skipTour.click();
    await skipTour.waitFor({ state: 'hidden' });
  } catch (error) {
    log('no tour to dismiss');
  }
  result.studyBrowserText = await page.locator('body').innerText();
  await page.screenshot({ path: path.join(job.outDir, '01-study-opened.png') });

  log('load the SEG overlay');
  await segItem.dblclick();
  const openIt = page.getByRole('button', { name: 'Yes', exact: true });
  await openIt.waitFor({ state: 'visible' });
  await page.screenshot({ path: path.join(job.outDir, '02-seg-prompt.png') });
  await openIt.click();
  await page.waitForFunction(() => {
    const tools = window.cornerstoneTools;
    const viewport = window.cornerstone.getRenderingEngines()[0].getViewports()[0];
    return tools.segmentation.state.getSegmentationRepresentations(viewport.id).length > 0;
  });
  await page.waitForTimeout(2000);
  result.segmentations = await page.evaluate(() => window.cornerstoneTools.segmentation.state.getSegmentations()
    .map((s) => ({ id: s.segmentationId, label: s.label,
                   segments: Object.values(s.segments).map((segment) => segment.label) })));
  // Open the segmentation panel (right side) where OHIF lists the segments of the SEG.
  const panelTab = page.locator('[data-cy^="panelSegmentation"][data-cy$="-btn"]').first();
  try {
    await panelTab.click({ timeout: 15000 });
    await page.getByText('Abscess', { exact: true }).first().waitFor({ state: 'visible', timeout: 20000 });
  } catch (error) {
    log('segmentation panel:', String(error).split('\n')[0]);
  }
  result.afterLoadText = await page.locator('body').innerText();
  await page.screenshot({ path: path.join(job.outDir, '03-seg-loaded.png') });

  result.slices = [];
  for (const slice of job.slices) {
    log('slice', slice.name);
    const placed = await page.evaluate(async ({ sopInstanceUid, points }) => {
      const cs = window.cornerstone;
      const viewport = cs.getRenderingEngines()[0].getViewports()[0];
      const ids = viewport.getImageIds();
      const index = ids.findIndex((id) => id.includes(`/instances/${sopInstanceUid}/`));
      if (index < 0) {
        return { error: `SOPInstanceUID ${sopInstanceUid} is not in the viewport's stack` };
      }
      await cs.utilities.jumpToSlice(viewport.element, { imageIndex: index });
      const deadline = Date.now() + 60000;
      while (!(viewport.getCurrentImageId() || '').includes(sopInstanceUid) && Date.now() < deadline) {
        await new Promise((resolve) => setTimeout(resolve, 200));
      }
      viewport.render();
      const rect = viewport.canvas.getBoundingClientRect();
      const page = {};
      for (const [key, world] of Object.entries(points)) {
        const [x, y] = viewport.worldToCanvas(world);
        page[key] = [rect.left + x, rect.top + y];
      }
      return { index, total: ids.length, currentImageId: viewport.getCurrentImageId(), page,
               canvas: [rect.left, rect.top, rect.width, rect.height] };
    }, { sopInstanceUid: slice.sopInstanceUid, points: slice.points });
    if (placed.error) {
      throw new Error(placed.error);
    }
    const shots = {};
    for (const visible of [true, false]) {
      await page.evaluate(async (show) => {
        const tools = window.cornerstoneTools;
        const viewport = window.cornerstone.getRenderingEngines()[0].getViewports()[0];
        for (const representation of tools.segmentation.state.getSegmentationRepresentations(viewport.id)) {
          tools.segmentation.config.visibility.setSegmentationRepresentationVisibility(
            viewport.id, { segmentationId: representation.segmentationId }, show);
        }
        viewport.render();
        await new Promise((resolve) => requestAnimationFrame(() => requestAnimationFrame(resolve)));
      }, visible);
      await page.waitForTimeout(1500);
      const file = path.join(job.outDir, `${slice.name}-overlay-${visible ? 'shown' : 'hidden'}.png`);
      await page.screenshot({ path: file });
      shots[visible ? 'shown' : 'hidden'] = file;
    }
    await page.evaluate(() => {
      const tools = window.cornerstoneTools;
      const viewport = window.cornerstone.getRenderingEngines()[0].getViewports()[0];
      for (const representation of tools.segmentation.state.getSegmentationRepresentations(viewport.id)) {
        tools.segmentation.config.visibility.setSegmentationRepresentationVisibility(
          viewport.id, { segmentationId: representation.segmentationId }, true);
      }
      viewport.render();
    });
    result.slices.push({ name: slice.name, ...placed, screenshots: shots,
                         overlayText: await page.locator('body').innerText() });
  }
});
