import type { ResultPromise } from 'execa';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { execaGuarded } from '../platform/local/guarded.js';
import { createHosts, waitForTcp } from '../platform/local/netns.js';

export const SERVICE_PORT = 8080;

/** A request staging answered, as its client saw it. */
export interface Answer {
  method: string;
  path: string;
  body: string;
  /** The client's address:port. */
  from: string;
  status: number;
}

/** Staging's users, sending requests until stopped. */
export interface Traffic {
  /**
   * Stops sending; resolves, once every request sent has been answered and the generator has
   * exited, with the number of connections it opened (0 if it did not say).
   */
  stop(): Promise<number>;
}

/** A sandbox "staging": a service in its own netns, and a client netns sending it traffic. */
export interface Staging {
  netns: string;
  serviceAddress: string;
  clientAddress: string;
  serviceUrl: string;
  /** Starts the users; `onAnswer` hears of each request staging answered. */
  startTraffic(onAnswer: (answer: Answer) => void): Traffic;
  destroy(): void;
}

function script(name: string): string {
  return fileURLToPath(new URL(`./${name}.js`, import.meta.url));
}

/**
 * Makes the namespaces (removing those of a demo that was killed), starts the service and
 * waits until it answers. Addresses are in 10.213.0.0/16, inside namespaces made here.
 */
export async function createStaging(): Promise<Staging> {
  const hosts = createHosts('mirrord-demo', 'staging', {
    serverAddress: '10.213.100.1',
    clientAddress: '10.213.100.2',
  });
  const serviceUrl = `http://${hosts.serverAddress}:${SERVICE_PORT}`;
  try {
    hosts.spawn(hosts.server, process.execPath, [
      script('service'),
      hosts.serverAddress,
      String(SERVICE_PORT),
    ]);
    await waitForTcp(hosts.client, hosts.serverAddress, SERVICE_PORT);
  } catch (error) {
    hosts.destroy();
    throw error;
  }
  const generators: ResultPromise[] = [];
  return {
    netns: hosts.server,
    serviceAddress: hosts.serverAddress,
    clientAddress: hosts.clientAddress,
    serviceUrl,
    startTraffic(onAnswer) {
      // Not hosts.spawn: that buffers all output, and the generator prints for as long as the
      // demo runs.
      // Guarded, as the service is (see createHosts).
      const generator = execaGuarded(
        'ip',
        ['netns', 'exec', hosts.client, process.execPath, script('traffic'), serviceUrl],
        {
          stdin: 'ignore',
          stdout: 'pipe',
          stderr: 'inherit',
          buffer: false,
          forceKillAfterDelay: 3000,
        },
      );
      generators.push(generator);
      let connections = 0;
      createInterface({ input: generator.stdout! }).on('line', (line) => {
        let said: Answer | { connections: number };
        try {
          said = JSON.parse(line) as typeof said;
        } catch {
          return; // not one of its reports (a warning of node's, say)
        }
        if ('connections' in said) connections = said.connections;
        else onAnswer(said);
      });
      let stopped: Promise<number> | undefined;
      return {
        stop() {
          generator.kill('SIGTERM');
          stopped ??= generator.then(() => connections);
          return stopped;
        },
      };
    },
    destroy() {
      for (const generator of generators) generator.kill('SIGKILL');
      hosts.destroy();
    },
  };
}
