// What the headless-Chromium drivers of the browser tests share (check_overlay.mjs, check_ui.mjs):
// the job file they are given, their log, and Debian's Chromium (CHROMIUM overrides the path;
// no browser is ever downloaded).

import fs from 'node:fs';
import { chromium } from 'playwright-core';

/** The driver's job (JSON file named on the command line), its output folder created. */
export function readJob() {
  const job = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
  fs.mkdirSync(job.outDir, { recursive: true });
  return job;
}

/** A logger to stderr (stdout carries the one JSON result). */
export function logger(name) {
  return (...parts) => console.error(`[${name} ${new Date().toISOString().slice(11, 19)}]`, ...parts);
}

/** Headless Chromium with a fresh profile and nothing that phones home. */
export function launchChromium() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
           '--disable-component-update', '--disable-sync'],
  });
}

/** Run the driver's steps; whatever happens, close the browser and print the result (one JSON line). */
export async function runSteps(browser, result, steps) {
  try {
    await steps();
  } catch (error) {
    result.error = String(error?.stack || error);
  } finally {
    await browser.close();
  }
  process.stdout.write(JSON.stringify(result) + '\n');
  process.exit(result.error ? 1 : 0);
}
