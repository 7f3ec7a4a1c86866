/**
 * A subscription the tap cannot set up, or tear down, does not end the session: a subscribe is
 * answered with the protocol's subscribe failure, an unsubscribe with a warning that the CLI
 * shows. The real agent and tap, in this process: the kernel's map update does not fail on
 * demand, so the one failing call is made to throw what the addon throws when it does (a
 * TapError).
 */
import { connect } from 'node:net';
import { startAgent, type RunningAgent } from '../src/agent/server.js';
import { Tap, TapError } from '../src/agent/tap.js';
import { AgentClient, AgentClientError } from '../src/protocol/client.js';
import { runMirror } from '../src/session/mirror.js';
import { placedInProcess } from './support/in-process-agent.js';
import { until } from './support/mirror-cli.js';
import { createSandbox, type Sandbox } from './support/sandbox.js';

/** The in-process agents' session secret. */
const SECRET = 'subscribe-test';
const FAILING_PORT = 7401;
const PORT = 7402;

describe('agent subscriptions', () => {
  let sandbox: Sandbox;
  let agent: RunningAgent | undefined;
  const subscribe = Tap.prototype.subscribe;
  const unsubscribe = Tap.prototype.unsubscribe;

  beforeEach(() => {
    sandbox = createSandbox('subscribe');
  });

  /** The real agent, in this process (so that its Tap's methods can be made to fail). */
  const startInProcess = (): Promise<RunningAgent> =>
    startAgent({
      target: { netns: sandbox.target },
      host: '127.0.0.1',
      port: 0,
      idleTimeoutMs: 10_000,
      secret: SECRET,
    });

  afterEach(async () => {
    Tap.prototype.subscribe = subscribe;
    Tap.prototype.unsubscribe = unsubscribe;
    agent?.stop();
    await agent?.done;
    sandbox.destroy();
  });

  test('a TapError from the tap is a subscribe failure, and the session goes on', async () => {
    Tap.prototype.subscribe = function (this: Tap, port: number) {
      if (port === FAILING_PORT) {
        throw new TapError('BPF_FAILED', `subscribing port ${port}: Operation not permitted`);
      }
      subscribe.call(this, port);
    };
    agent = await startInProcess();
    const socket = connect(agent.readiness.port, '127.0.0.1');
    const client = await AgentClient.start(socket, { clientName: 'test', secret: SECRET });
    const failure = await client.subscribe(FAILING_PORT).catch((error: unknown) => error);
    expect(failure).toBeInstanceOf(AgentClientError);
    expect(failure).toMatchObject({
      code: 'subscribe-failed',
      message: `cannot mirror port ${FAILING_PORT}: subscribing port ${FAILING_PORT}: Operation not permitted`,
    });
    await client.subscribe(PORT);
    await client.close();
    expect(await agent.done).toEqual({});
  });

  test('a TapError on unsubscribe is a warning the CLI shows, and mirroring goes on', async () => {
    Tap.prototype.unsubscribe = function (this: Tap, port: number) {
      throw new TapError('BPF_FAILED', `unsubscribing port ${port}: Operation not permitted`);
    };
    const lines: string[] = [];
    let interrupt!: () => void;
    const interrupted = new Promise<void>((resolve) => (interrupt = resolve));
    // The app closes its listener when something connects to it: the layer reports the close,
    // and the session unsubscribes the port.
    const app = `const server = require('net').createServer((s) => { s.destroy(); server.close(); }).listen(${PORT}); setInterval(() => {}, 1000);`;
    const session = runMirror({
      placeAgent: async () => {
        agent = await startInProcess();
        return placedInProcess(agent, SECRET);
      },
      command: [process.execPath, '-e', app],
      ports: new Map(),
      ignorePorts: new Set(),
      midStream: false,
      log: (line) => lines.push(line),
      interrupted,
    });
    await until(
      () => lines.includes(`mirrord: the app listens on ${PORT}: mirroring it`),
      'listen',
    );
    connect(PORT, '127.0.0.1').on('error', () => undefined);
    const warning = `mirrord: the agent warns: unsubscribing port ${PORT}: Operation not permitted`;
    await until(() => lines.includes(warning), 'the warning');
    interrupt();
    expect(await session).toBe(130);
    expect(lines.filter((line) => line.includes('session failed'))).toEqual([]);
  });
});
