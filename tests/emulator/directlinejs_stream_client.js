// Microsoft's DirectLineJS with webSocket: true (its default, what Web Chat uses) against the emulator.
// Usage: node directlinejs_stream_client.js <base url .../v3/directline>  (secret in DIRECTLINE_SECRET)
// Prints one JSON line describing what happened; exits non-zero on failure or after 30 s.
'use strict';

// Posting goes through rxjs' ajax, which needs XMLHttpRequest: Node has none, xhr2 provides it.
global.XMLHttpRequest = require('xhr2');
// Node 20 has no global WebSocket: DirectLineJS takes the global, so give it the `ws` package's,
// noting where each socket goes and when it is open (its URL's token stays out of the output).
const result = { statuses: [], received: [], streamPaths: [] };
let streamOpened;
const streamOpen = new Promise((resolve) => { streamOpened = resolve; });
global.WebSocket = class extends require('ws') {
  constructor(url, ...rest) {
    super(url, ...rest);
    result.streamPaths.push(new URL(url).pathname);
    this.addEventListener('open', () => streamOpened());
  }
};
const { DirectLine, ConnectionStatus } = require('botframework-directlinejs');

const domain = process.argv[2];
const secret = process.env.DIRECTLINE_SECRET;

function fail(message) {
  console.log(JSON.stringify({ ...result, error: String(message) }));
  process.exit(1);
}
setTimeout(() => fail('timed out'), 30000).unref();

async function main() {
  const generated = await fetch(`${domain}/tokens/generate`, {
    method: 'POST',
    headers: { Authorization: `Bearer ${secret}`, 'Content-Type': 'application/json' },
    body: JSON.stringify({ user: { id: 'dl_stream' } }),
  });
  if (generated.status !== 200) fail(`tokens/generate answered ${generated.status}`);
  const { token, conversationId } = await generated.json();
  result.generatedConversationId = conversationId;

  const directLine = new DirectLine({ domain, token, webSocket: true });
  result.usesWebSocket = directLine.webSocket;
  directLine.connectionStatus$.subscribe((status) => result.statuses.push(ConnectionStatus[status]));

  const echoed = new Promise((resolve) => {
    directLine.activity$.subscribe((activity) => {
      result.received.push({ id: activity.id, type: activity.type, from: activity.from, text: activity.text,
                             replyToId: activity.replyToId });
      if (activity.type === 'message' && activity.from.role === 'bot') resolve(activity);
    }, fail);
  });
  // A stream opened without a watermark carries only newer activities: post once it is open.
  await streamOpen;
  result.postedId = await new Promise((resolve, reject) => directLine
    .postActivity({ type: 'message', from: { id: 'dl_stream' }, text: 'hello over the stream' })
    .subscribe((id) => (id === 'retry' ? reject(new Error('post answered retry')) : resolve(id)), reject));
  result.conversationId = directLine.conversationId;
  result.echo = (await echoed).text;
  result.watermark = directLine.watermark;
  directLine.end();
  console.log(JSON.stringify(result));
  process.exit(0);
}

main().catch(fail);
