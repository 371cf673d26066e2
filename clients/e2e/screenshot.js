// Take a screenshot of the demo live room with some traffic in it:
//   node screenshot.js [out.png] [transport]
// Starts its own server (target/debug/livepush) like the tests do.
import { launch, openDemo, waitForCount, waitForJoined, sleep } from './lib/browser.js';
import { startServer } from './lib/server.js';

const out = process.argv[2] || 'demo.png';
const transport = process.argv[3] || 'auto';
const server = await startServer();
const browser = await launch();
try {
  const room = 'live:demo';
  const { page, consoleLines } = await openDemo(
    browser,
    `${server.url}/?room=${encodeURIComponent(room)}&transport=${transport}`,
  );
  await waitForJoined(page, room, transport === 'longpoll' ? 'long-polling' : transport === 'auto' ? 'websocket' : transport);
  const gifts = [
    ['gift', { from: 'alice', gift: 'rose', count: 3 }],
    ['chat', { from: 'bob', text: 'hello everyone 👋' }],
    ['red_envelope', { from: 'carol', amount: '¥8.88' }],
    ['chat', { from: 'dave', text: 'that rocket though' }],
    ['gift', { from: 'erin', gift: 'rocket' }],
    ['quiz', { q: 'Which planet has the most moons?', options: ['Jupiter', 'Saturn', 'Uranus'] }],
    ['control', { action: 'stream_switch', stream: '1080p backup' }],
    ['gift', { from: 'frank', gift: 'crown' }],
  ];
  for (const [type, data] of gifts) await server.publish(room, type, data);
  await page.fill('[data-testid="chat-input"]', 'first time here, hi!');
  await page.click('[data-testid="chat-send"]');
  await waitForCount(page, 6);
  await sleep(900);
  await page.screenshot({ path: out });
  console.log(`wrote ${out}`);
  if (consoleLines.length) console.log(consoleLines.join('\n'));
} finally {
  await browser.close();
  await server.stop();
}
