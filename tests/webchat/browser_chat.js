// The Web Chat demo in headless Chromium (Debian's, driven by playwright-core): chat, go offline until
// the token has expired, come back online, chat again.
// Usage: node browser_chat.js <demo page URL> [chromium path] [--chat-only]
// Prints one JSON line with what the page showed at each step; exits non-zero on a failed step.
// --chat-only: stop after the first answer (the page loads, connects and chats).
'use strict';

const fs = require('fs');
const os = require('os');
const path = require('path');
const { chromium } = require('playwright-core');

const demoUrl = process.argv[2];
const executablePath = process.argv[3] || '/usr/bin/chromium';
const chatOnly = process.argv.includes('--chat-only');
const STEP_MS = 20000;  // the deadline of each wait below
const result = { steps: [], console: [] };

const SEND_BOX = '[data-id="webchat-sendbox-input"]';

// Every message bubble's text, in transcript order.
function bubbles(page) {
  return page.$$eval('.webchat__bubble__content', (nodes) => nodes.map((n) => n.textContent.trim()));
}

function waitForBubble(page, text) {
  return page.waitForFunction(
    (wanted) => Array.from(document.querySelectorAll('.webchat__bubble__content'))
      .some((n) => n.textContent.trim() === wanted),
    text, { timeout: STEP_MS });
}

function waitForStatus(page, status) {
  return page.waitForFunction(
    (wanted) => document.getElementById('status').getAttribute('data-status') === String(wanted),
    status, { timeout: STEP_MS });
}

function session(page) {
  return page.evaluate(() => JSON.parse(sessionStorage.getItem('relayWebChat') || '{}'));
}

async function say(page, text) {
  await page.fill(SEND_BOX, text);
  await page.press(SEND_BOX, 'Enter');
  await waitForBubble(page, 'You said: ' + text);
}

async function main() {
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'relay-chromium-'));
  // A fresh profile of its own: nothing cached or stored from another run.
  const context = await chromium.launchPersistentContext(profile, {
    executablePath,
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  try {
    const page = context.pages()[0] || await context.newPage();
    page.on('console', (message) => result.console.push(`${message.type()}: ${message.text()}`.slice(0, 300)));
    page.on('pageerror', (error) => result.console.push(`pageerror: ${error.message}`.slice(0, 300)));

    await page.goto(demoUrl);
    await waitForStatus(page, 2);
    await page.waitForSelector(SEND_BOX, { timeout: STEP_MS });
    await say(page, 'hello');
    result.steps.push('chatted');
    if (chatOnly) {
      result.bubbles = await bubbles(page);
      return;
    }

    // At about half its lifetime the page refreshes its token, and goes on chatting.
    const firstExpiry = await page.evaluate(() => window.relayDirectLine.tokenExpiresAt);
    await page.waitForFunction(
      (first) => window.relayDirectLine.tokenExpiresAt > first, firstExpiry, { timeout: STEP_MS, polling: 100 });
    await say(page, 'refreshed');
    const before = await session(page);
    result.steps.push('refreshed');

    await context.setOffline(true);
    result.offlineSeen = await page.evaluate(() => navigator.onLine === false);
    // Offline until the page's last token has expired (plus a second for the clocks).
    await page.waitForFunction(() => {
      const expiresAt = window.relayDirectLine.tokenExpiresAt;
      return expiresAt > 0 && Date.now() > expiresAt + 1000;
    }, null, { timeout: STEP_MS, polling: 200 });
    result.statusWhileOffline = await page.evaluate(() => document.getElementById('status').getAttribute('data-status'));
    result.steps.push('token expired offline');

    await context.setOffline(false);
    await page.waitForFunction(
      (oldKey) => {
        const state = JSON.parse(sessionStorage.getItem('relayWebChat') || '{}');
        return state.resumeKey && state.resumeKey !== oldKey
          && document.getElementById('status').getAttribute('data-status') === '2';
      },
      before.resumeKey, { timeout: STEP_MS, polling: 100 });
    const after = await session(page);
    result.steps.push('resumed');

    await say(page, 'after the break');
    result.steps.push('chatted again');
    result.conversationBefore = before.conversationId;
    result.conversationAfter = after.conversationId;
    result.userId = after.userId;
    result.bubbles = await bubbles(page);

    // A reload keeps the tab's session: the page resumes and rebuilds the whole transcript.
    await page.reload();
    await waitForStatus(page, 2);
    await waitForBubble(page, 'You said: after the break');
    result.conversationAfterReload = (await session(page)).conversationId;
    result.bubblesAfterReload = await bubbles(page);
    result.steps.push('reloaded');
  } finally {
    await context.close();
    fs.rmSync(profile, { recursive: true, force: true });
  }
}

main().then(() => {
  console.log(JSON.stringify(result));
}, (error) => {
  result.error = String(error && error.stack || error).slice(0, 2000);
  console.log(JSON.stringify(result));
  process.exit(1);
});
