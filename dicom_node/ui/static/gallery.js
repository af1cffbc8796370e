// The similar-case gallery of one study: /abscess-node/studies/{id}/gallery, drawn as cards with the
// best-matching slice pairs (query slice beside matched slice, the abscess overlay drawn by the node).
'use strict';

const page = new URLSearchParams(location.search);
const orthancStudyId = page.get('study') || '';
for (const name of ['mode', 'k', 'pairs']) {
  if (page.get(name)) document.getElementById(name).value = page.get(name);
}

const LESION_COLUMNS = [
  ['label', 'lesion', (value) => `#${value}`],
  ['volume_ml', 'volume', (value) => `${value.toFixed(1)} ml`],
  ['longest_axial_diameter_mm', 'longest axial Ø', (value) => `${value.toFixed(0)} mm`],
  ['core_mean_hu', 'core', (value) => (value === null ? '' : `${value.toFixed(0)} HU`)],
  ['loculi', 'loculi', String],
  ['space', 'space', (value) => value || ''],
  ['first_slice', 'slices', (value, lesion) => `${value}–${lesion.last_slice}`],
];

function showMessage(text, isError) {
  document.getElementById('message').replaceChildren(
    text ? el('div', { class: `notice${isError ? ' error' : ''}`, role: 'status' }, text) : '');
}

function lesionTable(lesions) {
  if (!lesions.length) return el('div', { class: 'legend' }, 'no lesion segmented in this study');
  return el('table', { class: 'lesions' },
    el('tr', {}, LESION_COLUMNS.map(([, title]) => el('th', {}, title))),
    lesions.slice(0, 5).map((lesion) => el('tr', {},
      LESION_COLUMNS.map(([key, , format]) => el('td', {}, format(lesion[key], lesion))))));
}

function thumbnail(url, caption, role) {
  return el('figure', {},
    url ? el('img', { src: url, alt: caption, 'data-role': role, width: 256, loading: 'lazy' })
        : el('div', { class: 'legend' }, 'slice not available'),
    el('figcaption', {}, caption));
}

function studyLine(study, pseudonymized) {
  const parts = pseudonymized
    ? [`case ${study.patient_id || '(pseudonymised)'}`, 'pseudonymised: no name, date or viewer link']
    : [study.study_description, study.study_date, study.patient_id && `patient ${study.patient_id}`];
  return parts.filter(Boolean).join(' · ');
}

function caseCard(item, pseudonymized) {
  return el('article', { class: 'case', 'data-rank': item.rank },
    el('h2', {}, `#${item.rank}`,
      el('span', { class: 'score' }, `score ${item.score.toFixed(3)} · ${item.mode}`),
      item.viewer_url ? el('a', { href: item.viewer_url, target: '_blank', rel: 'noopener' }, 'Open in OHIF') : null),
    el('div', { class: 'study' }, studyLine(item, pseudonymized)),
    lesionTable(item.lesions || []),
    el('div', { class: 'pairs' }, (item.pairs || []).map((pair) => el('div', { class: 'pair', 'data-similarity': pair.similarity },
      thumbnail(pair.query_thumbnail, `query slice ${pair.query_slice}`, 'query'),
      thumbnail(pair.matched_thumbnail, `matched slice ${pair.matched_slice} · similarity ${pair.similarity.toFixed(3)}`, 'matched')))));
}

async function load() {
  document.getElementById('query-study').textContent = orthancStudyId;
  if (!orthancStudyId) {
    showMessage('open this page from the queue (a done job\'s "similar cases" link)', true);
    return;
  }
  const query = new URLSearchParams({ mode: document.getElementById('mode').value,
                                      k: document.getElementById('k').value,
                                      pairs: document.getElementById('pairs').value });
  showMessage('searching…', false);
  document.getElementById('cases').replaceChildren();
  try {
    const answer = await requestJson(NODE.api(`studies/${encodeURIComponent(orthancStudyId)}/gallery?${query}`));
    document.getElementById('query-study').textContent = answer.query.study_uid;
    document.getElementById('query-viewer').href = NODE.ohif(answer.query.study_uid);
    if (!answer.cases.length) {
      showMessage(answer.query.mode === 'roi'
        ? 'no similar case: in roi mode only studies with a segmented abscess compare; try the study mode'
        : 'no similar case in the index yet', false);
      return;
    }
    showMessage(answer.pseudonymized ? 'other patients are shown by keyed pseudonyms (PseudonymizeSimilarCases)' : '', false);
    document.getElementById('cases').replaceChildren(...answer.cases.map((item) => caseCard(item, answer.pseudonymized)));
  } catch (error) {
    showMessage(error.status === 403 ? `similar cases are not shown to you: ${error.message}` : error.message, true);
  }
}

for (const name of ['mode', 'k', 'pairs']) document.getElementById(name).addEventListener('change', load);
load();
