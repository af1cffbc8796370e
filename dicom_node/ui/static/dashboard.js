// The queue dashboard: jobs by state from /abscess-node/jobs, details per job, retry / cancel / re-run.
'use strict';

const STATES = ['queued', 'running', 'done', 'failed', 'skipped', 'cancelled'];
const REFRESH_MS = 5000;
const view = {
  state: new URLSearchParams(location.search).get('state') || '',
  open: new Set(),
  timer: null,
  jobs: [],
};

function stateBadge(state) {
  return el('span', { class: `state state-${state}` }, state);
}

function totalSeconds(timings) {
  return Object.values(timings || {}).reduce((sum, value) => sum + Number(value), 0);
}

function stageColumn(job) {
  if (job.state === 'running') {
    const since = job.stage_started ? Math.max(0, Date.now() / 1000 - job.stage_started) : null;
    return `${job.stage || 'claimed'}${since === null ? '' : ` · ${seconds(since)}`}`;
  }
  return job.timings ? seconds(totalSeconds(job.timings)) : '';
}

function studyLinks(job) {
  return el('span', { class: 'links' },
    job.study_uid ? el('a', { href: NODE.ohif(job.study_uid), target: '_blank', rel: 'noopener' }, 'OHIF') : null,
    job.study_uid ? ' · ' : null,
    el('a', { href: NODE.explorer(job.orthanc_study_id), target: '_blank', rel: 'noopener' }, 'Explorer'),
    job.state === 'done' ? ' · ' : null,
    job.state === 'done' ? el('a', { href: NODE.gallery(job.orthanc_study_id) }, 'similar cases') : null);
}

function retriedAs(job) {
  const later = view.jobs.filter((other) => other.orthanc_study_id === job.orthanc_study_id && other.id > job.id);
  return later.length ? later[later.length - 1].id : null;
}

function jobRow(job) {
  const newer = job.state === 'failed' ? retriedAs(job) : null;
  return el('tr', { class: 'job', 'data-job-id': job.id, 'data-state': job.state,
                    onclick: () => toggle(job.id), title: 'show or hide the details' },
    el('td', {}, `#${job.id}`),
    el('td', {}, stateBadge(job.state), newer ? el('div', { class: 'legend' }, `re-queued as #${newer}`) : null),
    el('td', {}, el('div', { class: 'uid', title: job.study_uid || '' }, shortUid(job.study_uid) || job.orthanc_study_id),
       studyLinks(job)),
    el('td', {}, job.reason || ''),
    el('td', {}, String(job.attempts ?? 0)),
    el('td', {}, stageColumn(job)),
    el('td', {}, localTime(job.created)),
    el('td', {}, localTime(job.finished)),
    el('td', { class: 'error', title: job.error || '' }, job.error || ''));
}

function definitions(pairs) {
  return el('dl', {}, pairs.filter(([, value]) => value !== null && value !== undefined && value !== '')
    .map(([name, value]) => [el('dt', {}, name), el('dd', {}, value)]));
}

function selectionSection(job) {
  const selection = job.selection || {};
  const skipped = Object.entries(selection.skipped || {});
  return el('section', { class: 'selection' }, el('h3', {}, 'Series'),
    definitions([['chosen', selection.chosen ? el('span', { class: 'uid' }, selection.chosen) : (job.state === 'queued' ? 'not yet chosen' : 'none')],
                 ['why', selection.why || '']]),
    skipped.length ? el('div', {}, 'skipped:', el('ul', { class: 'plain' },
      skipped.map(([uid, why]) => el('li', {}, el('span', { class: 'uid' }, uid), `: ${why}`)))) : null,
    (selection.warnings || []).length ? el('div', {}, 'warnings:', el('ul', { class: 'plain' },
      selection.warnings.map((warning) => el('li', {}, warning)))) : null);
}

function timingSection(job) {
  const timings = Object.entries(job.timings || {});
  return el('section', { class: 'timings' }, el('h3', {}, 'Seconds per stage'),
    timings.length ? timings.map(([stage, value]) => el('div', { class: 'stage-bar', 'data-stage': stage },
      el('span', {}, stage), el('span', { class: 'bar', 'data-width': value }),
      el('span', { class: 'seconds' }, seconds(value))))
      : el('div', { class: 'legend' }, job.state === 'running' ? `in stage ${job.stage || 'claimed'}` : 'no stage ran'),
    timings.length ? el('div', { class: 'legend' }, `total ${seconds(totalSeconds(job.timings))}`) : null);
}

function attemptSection(job) {
  const errors = job.attempt_errors || [];
  return el('section', { class: 'attempts' }, el('h3', {}, `Attempts (${job.attempts ?? 0})`),
    definitions([['worker', job.worker || ''], ['started', localTime(job.started)], ['error', job.error || '']]),
    errors.length ? el('ul', { class: 'plain' }, errors.map((entry) =>
      el('li', {}, `attempt ${entry.attempt} (${localTime(entry.at)}): ${entry.error}`))) : null);
}

function forwardSection(job) {
  const forwards = job.forwards || [];
  return el('section', { class: 'forwards' }, el('h3', {}, 'Forwarding'),
    forwards.length ? el('ul', { class: 'plain' }, forwards.map((forward) =>
      el('li', { 'data-destination': forward.destination, 'data-forward-state': forward.state },
        `${forward.destination}: ${forward.state} after ${forward.attempts} attempt(s)`,
        forward.last_error ? ` — ${forward.last_error}` : ''))) : el('div', { class: 'legend' }, 'no destination'));
}

function resultSection(job) {
  const result = job.result || {};
  if (!Object.keys(result).length) return null;
  return el('section', { class: 'result' }, el('h3', {}, 'Result'),
    definitions([['note', result.note || ''], ['frames', result.frames], ['lesions found', result.lesions_found],
                 ['slices with lesion', result.slices_with_lesion], ['peak memory', result.peak_rss_mb ? `${result.peak_rss_mb} MiB` : ''],
                 ['SEG', result.seg ? el('span', { class: 'uid' }, result.seg.sop_instance_uid) : ''],
                 ['similar studies', (result.similar_studies || []).length || '']]));
}

function actionButtons(job) {
  const buttons = [];
  if (job.state === 'failed') buttons.push(['retry', 'Retry', `Queue study ${job.study_uid || job.orthanc_study_id} again (job #${job.id} failed)?`]);
  if (job.state === 'queued') buttons.push(['cancel', 'Cancel', `Cancel job #${job.id}? The study is not processed.`]);
  if (['done', 'skipped', 'cancelled'].includes(job.state)) {
    buttons.push(['rerun', 'Re-run', `Process study ${job.study_uid || job.orthanc_study_id} again, even if unchanged?`]);
  }
  return el('div', { class: 'actions' }, buttons.map(([action, label, question]) =>
    el('button', { type: 'button', class: action === 'cancel' ? 'danger' : null, 'data-action': action,
                   onclick: (event) => { event.stopPropagation(); act(job, action, question); } }, label)));
}

function detailsRow(job) {
  const row = el('tr', { class: 'details', 'data-job-id': job.id },
    el('td', { colspan: 9 },
      el('div', { class: 'detail-grid' }, selectionSection(job), timingSection(job), attemptSection(job),
         forwardSection(job), resultSection(job)),
      actionButtons(job)));
  const longest = Math.max(0.001, ...Object.values(job.timings || {}).map(Number));
  for (const bar of row.querySelectorAll('span.bar')) {  // through the CSSOM: the CSP allows no style attributes
    bar.style.width = `${Math.max(1, 100 * Number(bar.dataset.width) / longest)}%`;
  }
  return row;
}

function toggle(jobId) {
  if (view.open.has(jobId)) view.open.delete(jobId); else view.open.add(jobId);
  renderJobs();
}

async function act(job, action, question) {
  if (!window.confirm(question)) return;
  try {
    const answer = await requestJson(NODE.api(`jobs/${job.id}/${action}`),
      { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: '{}' });
    showMessage(action === 'cancel' ? `job #${job.id} cancelled`
      : `job #${job.id}: study queued again as job #${answer.id} (${answer.state})`, false);
    view.open.add(answer.id);
  } catch (error) {
    showMessage(`${action} of job #${job.id} refused: ${error.message}`, true);
  }
  await refresh();
}

function showMessage(text, isError) {
  const box = document.getElementById('message');
  box.replaceChildren(text ? el('div', { class: `notice${isError ? ' error' : ''}`, role: 'status' }, text) : '');
}

function renderTabs(counts) {
  const total = Object.values(counts).reduce((sum, value) => sum + value, 0);
  const tab = (state, label, count) => el('button', {
    type: 'button', 'data-state': state, 'aria-pressed': String(view.state === state),
    onclick: () => { view.state = state; refresh(); } }, `${label} (${count})`);
  document.getElementById('states').replaceChildren(tab('', 'all', total),
    ...STATES.map((state) => tab(state, state, counts[state] || 0)));
}

function renderJobs() {
  const body = document.querySelector('#jobs tbody');
  const rows = [];
  for (const job of view.jobs) {
    rows.push(jobRow(job));
    if (view.open.has(job.id)) rows.push(detailsRow(job));
  }
  body.replaceChildren(...rows);
  if (!view.jobs.length) body.replaceChildren(el('tr', {}, el('td', { colspan: 9, class: 'empty' }, 'no job')));
}

async function refresh() {
  const query = new URLSearchParams({ limit: document.getElementById('limit').value });
  if (view.state) query.set('state', view.state);
  const study = document.getElementById('study').value.trim();
  if (study) query.set('study', study);
  try {
    const [counts, jobs] = await Promise.all([requestJson(NODE.api('jobs/counts')), requestJson(NODE.api(`jobs?${query}`))]);
    view.jobs = jobs;
    renderTabs(counts.jobs);
    renderJobs();
    document.getElementById('updated').textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (error) {
    showMessage(`the job list could not be read: ${error.message}`, true);
  }
}

function schedule() {
  clearInterval(view.timer);
  if (document.getElementById('auto').checked) view.timer = setInterval(refresh, REFRESH_MS);
}

document.getElementById('auto').addEventListener('change', schedule);
document.getElementById('limit').addEventListener('change', refresh);
document.getElementById('study').addEventListener('change', refresh);
refresh();
schedule();
