// Headless-Chromium driver of tests/e2e/test_ui.py: the node's own pages as an admin or a
// radiologist uses them (the queue dashboard, its retry action, the similar-case gallery, /ohif/).
//
//   node check_ui.mjs job.json
//
// job.json: {mode: "dashboard" | "gallery", url, credentials: {username, password}, outDir, ...}
//   dashboard: expand: [job ids], retry: job id, ohifUrl
//   gallery: cases (expected number of cards), refusedCredentials (a user the policy refuses)
// Prints one JSON object on stdout: what the pages showed and where the screenshots are. The
// checks are the test's (Python); this script only drives the browser. Uses Debian's
// /usr/bin/chromium (CHROMIUM overrides it); never downloads a browser.

import path from 'node:path';
import { launchChromium, logger, readJob, runSteps } from './driver.mjs';

const job = readJob();
const STEP_TIMEOUT = Number(job.stepTimeoutMs || 60000);
const log = logger('check_ui');
const browser = await launchChromium();
const result = { consoleErrors: [], httpErrors: [], outsideRequests: [] };

async function openPage(credentials, viewport = { width: 1400, height: 900 }) {
  const context = await browser.newContext({ viewport, deviceScaleFactor: 1, httpCredentials: credentials || undefined });
  const page = await context.newPage();
  page.setDefaultTimeout(STEP_TIMEOUT);
  const origin = new URL(job.url).origin;
  page.on('console', (message) => { if (message.type() === 'error') result.consoleErrors.push(message.text().slice(0, 300)); });
  page.on('request', (request) => {
    if (!request.url().startsWith(origin) && !request.url().startsWith('data:')) result.outsideRequests.push(request.url());
  });
  page.on('response', (response) => { if (response.status() >= 400) result.httpErrors.push(`${response.status()} ${response.url()}`); });
  page.on('dialog', (dialog) => { result.dialogs = [...(result.dialogs || []), dialog.message()]; dialog.accept(); });
  return page;
}

async function dashboard() {
  const page = await openPage(job.credentials);
  log('open', job.url);
  await page.goto(job.url, { waitUntil: 'load' });
  for (const id of job.expand) {
    const row = page.locator(`tr.job[data-job-id="${id}"]`);
    await row.waitFor({ state: 'visible' });
    await row.click();
    await page.locator(`tr.details[data-job-id="${id}"]`).waitFor({ state: 'visible' });
  }
  result.jobs = {};
  for (const id of job.expand) {
    result.jobs[id] = {
      state: await page.locator(`tr.job[data-job-id="${id}"]`).getAttribute('data-state'),
      row: await page.locator(`tr.job[data-job-id="${id}"]`).innerText(),
      details: await page.locator(`tr.details[data-job-id="${id}"]`).innerText(),
      links: await page.locator(`tr.job[data-job-id="${id}"] a`).evaluateAll((links) => links.map((a) => a.href)),
      actions: await page.locator(`tr.details[data-job-id="${id}"] button`).evaluateAll(
        (buttons) => buttons.map((b) => b.dataset.action)),
    };
  }
  result.tabs = await page.locator('#states').innerText();
  result.screenshot = path.join(job.outDir, 'dashboard.png');
  await page.screenshot({ path: result.screenshot, fullPage: true });

  log('retry job', job.retry);
  await page.locator(`tr.details[data-job-id="${job.retry}"] button[data-action="retry"]`).click();
  const notice = page.locator('#message .notice');
  await notice.filter({ hasText: 'queued again' }).waitFor({ state: 'visible' });
  result.retryNotice = await notice.innerText();
  const retried = Number(/as job #(\d+)/.exec(result.retryNotice)[1]);
  await page.locator(`tr.job[data-job-id="${retried}"]`).waitFor({ state: 'visible' });
  result.retried = { id: retried, row: await page.locator(`tr.job[data-job-id="${retried}"]`).innerText() };
  result.failedRowAfterRetry = await page.locator(`tr.job[data-job-id="${job.retry}"]`).innerText();

  log('without a login');
  const stranger = await openPage(null);
  const answered = stranger.waitForResponse((response) => response.url() === job.url);
  const shown = await stranger.goto(job.url, { waitUntil: 'load' }).then(() => 'page', (error) => String(error).split('\n')[0]);
  result.anonymousStatus = (await answered).status();  // Chromium stops at the login prompt it cannot answer
  result.anonymousPage = shown;

  log('open', job.ohifUrl);
  const viewer = await openPage(job.credentials);
  const opened = await viewer.goto(job.ohifUrl, { waitUntil: 'load' });
  result.ohif = { status: opened.status(), url: viewer.url() };
  await viewer.waitForFunction(() => document.querySelector('#root')?.innerText.trim().length > 0);
  result.ohif.text = (await viewer.locator('#root').innerText()).slice(0, 2000);
  result.ohif.screenshot = path.join(job.outDir, 'ohif-root.png');
  await viewer.screenshot({ path: result.ohif.screenshot });
}

async function gallery() {
  const page = await openPage(job.credentials, { width: 1280, height: 1000 });
  log('open', job.url);
  await page.goto(job.url, { waitUntil: 'load' });
  await page.locator('article.case').nth(job.cases - 1).waitFor({ state: 'visible' });
  await page.waitForFunction(() => [...document.querySelectorAll('article.case img')]
    .every((img) => img.complete && img.naturalWidth > 0));
  result.cards = [];
  for (const card of await page.locator('article.case').all()) {
    const rank = await card.getAttribute('data-rank');
    const pairs = [];
    for (const [index, pair] of (await card.locator('.pair').all()).entries()) {
      const shots = {};
      for (const role of ['query', 'matched']) {
        shots[role] = path.join(job.outDir, `rank${rank}-pair${index}-${role}.png`);
        await pair.locator(`img[data-role="${role}"]`).screenshot({ path: shots[role] });
      }
      pairs.push({ text: await pair.innerText(), screenshots: shots,
                   sources: await pair.locator('img').evaluateAll((imgs) => imgs.map((img) => img.getAttribute('src'))) });
    }
    result.cards.push({ rank: Number(rank), text: await card.innerText(), pairs,
                        links: await card.locator('a').evaluateAll((links) => links.map((a) => a.href)) });
  }
  result.screenshot = path.join(job.outDir, 'gallery.png');
  await page.screenshot({ path: result.screenshot, fullPage: true });

  log('as a user the policy refuses');
  const refused = await openPage(job.refusedCredentials);  // logged in, but not allowed similar cases
  await refused.goto(job.url, { waitUntil: 'load' });
  const notice = refused.locator('#message .notice.error');
  await notice.waitFor({ state: 'visible' });
  result.refusedNotice = await notice.innerText();
  result.refusedCards = await refused.locator('article.case').count();
}

await runSteps(browser, result, () => (job.mode === 'gallery' ? gallery() : dashboard()));
