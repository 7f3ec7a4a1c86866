/**
 * A subscription the tap cannot set up is answered with the protocol's subscribe failure, and
 * the agent goes on serving the session. The real agent and tap, in this process: the kernel's
 * map update does not fail on demand, so the one failing call is made to throw what the addon
 * throws when it does (a TapError).
 */
import { connect } from 'node:net';
import { startAgent, type RunningAgent } from '../src/agent/server.js';
import { Tap, TapError } from '../src/agent/tap.js';
import { AgentClient, AgentClientError } from '../src/protocol/client.js';
import { createSandbox, type Sandbox } from './support/sandbox.js';

const FAILING_PORT = 7401;
const PORT = 7402;

describe('agent subscriptions', () => {
  let sandbox: Sandbox;
  let agent: RunningAgent | undefined;
  const subscribe = Tap.prototype.subscribe;

  beforeEach(() => {
    sandbox = createSandbox('subscribe');
  });

  afterEach(async () => {
    Tap.prototype.subscribe = subscribe;
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
    agent = await startAgent({
      target: { netns: sandbox.target },
      host: '127.0.0.1',
      port: 0,
      idleTimeoutMs: 10_000,
    });
    const socket = connect(agent.readiness.port, '127.0.0.1');
    const client = await AgentClient.start(socket, { clientName: 'test' });
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
});
