// The Web Chat demo in headless Chromium (Debian's, driven by playwright-core): chat, go offline (or
// sleep) until the token has expired, come back, chat again, reload.
// The browser speaks German (navigator.language de-DE): the page's start event carries that locale.
// Usage: node browser_chat.js <demo page URL> [chromium path] [--chat-only] [--sleep <emulator URL>]
// Prints one JSON line with what the page showed at each step; exits non-zero on a failed step.
// --chat-only: stop after the first answer (the page loads, connects and chats).
// --sleep: the page sleeps instead, as on a closed laptop: none of its JavaScript runs (paused in the
//   debugger: headless Chromium does not freeze a visible page for Page.setWebLifecycleState), while
//   the bot says "while you slept" (through the emulator's Bot Connector endpoint at <emulator URL>);
//   it wakes once its token has expired.
'use strict';

const fs = require('fs');
const os = require('os');
const path = require('path');
const { chromium } = require('playwright-core');

const demoUrl = process.argv[2];
const executablePath = process.argv[3] || '/usr/bin/chromium';
const chatOnly = process.argv.includes('--chat-only');
const sleepAt = process.argv.indexOf('--sleep');
const emulatorUrl = sleepAt > 0 ? process.argv[sleepAt + 1] : null;
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

// The bot speaks on its own, as a bot does through the Bot Connector API.
async function botSays(conversationId, text) {
  const response = await fetch(`${emulatorUrl}/v3/conversations/${encodeURIComponent(conversationId)}/activities`, {
    method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify({ type: 'message', text }),
  });
  if (!response.ok) { throw new Error(`the bot could not speak: ${response.status}`); }
}

// Until the wall clock passes `moment` (ms): the page sleeps through a deadline, nothing to poll for.
function until(moment) {
  return new Promise((resolve) => setTimeout(resolve, Math.max(0, moment - Date.now())));
}

async function main() {
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'relay-chromium-'));
  // A fresh profile of its own: nothing cached or stored from another run.
  const context = await chromium.launchPersistentContext(profile, {
    executablePath,
    headless: true,
    locale: 'de-DE',
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

    // The page's token expires (plus a second for the clocks) while the page is away.
    if (emulatorUrl) {
      const expiresAt = await page.evaluate(() => window.relayDirectLine.tokenExpiresAt);
      const cdp = await context.newCDPSession(page);
      await cdp.send('Debugger.enable');
      await cdp.send('Debugger.pause');  // at the next statement the page runs (its timers run every second)
      result.steps.push('asleep');
      await botSays(before.conversationId, 'while you slept');
      await until(expiresAt + 1000);
      await cdp.send('Debugger.resume');
      await cdp.send('Debugger.disable');
      result.steps.push('woke after its token expired');
    } else {
      await context.setOffline(true);
      result.offlineSeen = await page.evaluate(() => navigator.onLine === false);
      await page.waitForFunction(() => {
        const expiry = window.relayDirectLine.tokenExpiresAt;
        return expiry > 0 && Date.now() > expiry + 1000;
      }, null, { timeout: STEP_MS, polling: 200 });
      result.statusWhileOffline = await page.evaluate(
        () => document.getElementById('status').getAttribute('data-status'));
      result.steps.push('token expired offline');
      await context.setOffline(false);
    }

    await page.waitForFunction(
      (oldKey) => {
        const state = JSON.parse(sessionStorage.getItem('relayWebChat') || '{}');
        return state.resumeKey && state.resumeKey !== oldKey
          && document.getElementById('status').getAttribute('data-status') === '2';
      },
      before.resumeKey, { timeout: STEP_MS, polling: 100 });
    const after = await session(page);
    result.steps.push('resumed');
    if (emulatorUrl) {
      await waitForBubble(page, 'while you slept');
    }

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
