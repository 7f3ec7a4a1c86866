import { connectToAgent } from '../protocol/client.js';
import { startLocalAgent } from '../platform/local/agent-process.js';
import { SERVICE_PORT, createStaging } from './staging.js';

export interface DemoOptions {
  /** Seconds to run; 0 runs until interrupted. */
  durationSeconds: number;
  log(line: string): void;
  /** Resolves when the user interrupts (Ctrl-C). */
  interrupted: Promise<void>;
}

/** The first line of a request and its body, for display. */
function summarize(bytes: Buffer): string {
  const text = bytes.toString('latin1');
  const [head = '', body = ''] = text.split('\r\n\r\n');
  const requestLine = head.split('\r\n')[0] ?? '';
  return body ? `${requestLine}  ${body}` : requestLine;
}

/**
 * The embedded demo: a sandbox "staging" service with traffic, an agent tapping it, and the
 * mirrored requests printed as they arrive. Everything it makes is removed when it ends.
 */
export async function runDemo(options: DemoOptions): Promise<void> {
  const { log } = options;
  log('creating a sandbox "staging": a service in its own network namespace, and its users');
  const staging = await createStaging();
  let agent: Awaited<ReturnType<typeof startLocalAgent>> | undefined;
  try {
    agent = await startLocalAgent({ netns: staging.netns });
    log(
      `agent tapping ${agent.readiness.target} on ${agent.readiness.interfaces.join(', ')} (${agent.readiness.attachMode})`,
    );
    const client = await connectToAgent(agent.readiness.address, agent.readiness.port, {
      clientName: 'mirrord demo',
    });
    const sessionEnded = new Promise<void>((resolve) => client.once('end', resolve));
    client.on('error', (error) => log(`session failed: ${error.message}`));
    client.on('opened', (c) =>
      log(`connection ${c.id} from ${c.client.address}:${c.client.port} → :${c.server.port}`),
    );
    client.on('data', (d) => log(`  mirrored on ${d.id}: ${summarize(d.bytes)}`));
    client.on('closed', (c) => log(`connection ${c.id} closed (${c.reason})`));
    await client.subscribe(SERVICE_PORT);
    log(`mirroring ${staging.serviceUrl}; Ctrl-C to stop`);
    staging.startTraffic();
    const waits = [options.interrupted, sessionEnded];
    if (options.durationSeconds > 0) {
      waits.push(new Promise((resolve) => setTimeout(resolve, options.durationSeconds * 1000)));
    }
    await Promise.race(waits);
    await client.close();
  } finally {
    await agent?.stop();
    staging.destroy();
    log('removed the sandbox');
  }
}
