// Microsoft's DirectLineJS (polling, no WebSocket) against the emulator, as Web Chat drives it.
// Usage: node directlinejs_client.js <base url .../v3/directline>  (secret in DIRECTLINE_SECRET)
// Prints one JSON line describing what happened; exits non-zero on failure or after 30 s.
'use strict';

// DirectLineJS talks through rxjs' ajax, which needs XMLHttpRequest: Node has none, xhr2 provides it.
global.XMLHttpRequest = require('xhr2');
// It also reads the WebSocket global even with webSocket: false; Node 20 has none, so declare it empty.
if (!('WebSocket' in global)) global.WebSocket = undefined;
const { DirectLine, ConnectionStatus } = require('botframework-directlinejs');

const domain = process.argv[2];
const secret = process.env.DIRECTLINE_SECRET;
const result = { statuses: [], received: [] };

function fail(message) {
  console.log(JSON.stringify({ ...result, error: String(message) }));
  process.exit(1);
}
setTimeout(() => fail('timed out'), 30000).unref();

function nextEcho(directLine, text) {
  return new Promise((resolve) => {
    const subscription = directLine.activity$.subscribe((activity) => {
      result.received.push({ id: activity.id, from: activity.from, text: activity.text, replyToId: activity.replyToId });
      if (activity.from.role === 'bot' && activity.text && activity.text.includes(text)) {
        subscription.unsubscribe();
        resolve(activity);
      }
    }, fail);
  });
}

function post(directLine, text) {
  return new Promise((resolve, reject) => {
    directLine.postActivity({ type: 'message', from: { id: 'dl_js', name: 'DirectLineJS' }, text })
      .subscribe((id) => (id === 'retry' ? reject(new Error('post answered retry')) : resolve(id)), reject);
  });
}

async function main() {
  // A server gets the token with the secret, as a token endpoint would.
  const generated = await fetch(`${domain}/tokens/generate`, {
    method: 'POST', headers: { Authorization: `Bearer ${secret}` },
  });
  if (generated.status !== 200) fail(`tokens/generate answered ${generated.status}`);
  const { token, conversationId } = await generated.json();
  result.generatedConversationId = conversationId;

  const directLine = new DirectLine({ domain, token, webSocket: false, pollingInterval: 200 });
  directLine.connectionStatus$.subscribe((status) => result.statuses.push(ConnectionStatus[status]));

  const firstEcho = nextEcho(directLine, 'hello from directlinejs');
  result.postedId = await post(directLine, 'hello from directlinejs');
  result.conversationId = directLine.conversationId;
  result.firstEcho = (await firstEcho).text;
  result.watermark = directLine.watermark;

  // What refreshTokenLoop does every 15 minutes, now.
  result.refreshedToken = await new Promise((resolve, reject) => directLine.refreshToken().subscribe(resolve, reject));
  result.tokenChanged = result.refreshedToken !== token;
  directLine.token = result.refreshedToken;

  const secondEcho = nextEcho(directLine, 'after refresh');
  await post(directLine, 'after refresh');
  result.secondEcho = (await secondEcho).text;
  delete result.refreshedToken;
  directLine.end();
  console.log(JSON.stringify(result));
  process.exit(0);
}

main().catch(fail);
