import { execa, type ResultPromise } from 'execa';
import { fileURLToPath } from 'node:url';
import {
  createNetnsPair,
  deleteNetns,
  isStale,
  listNetns,
  netnsName,
  waitForTcp,
} from '../platform/local/netns.js';

const DEMO_PREFIX = 'mirrord-demo';
export const SERVICE_PORT = 8080;

/** A sandbox "staging": a service in its own netns, and a client netns sending it traffic. */
export interface Staging {
  netns: string;
  serviceUrl: string;
  startTraffic(): void;
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
  for (const stale of listNetns(DEMO_PREFIX).filter(isStale)) deleteNetns(stale);
  const netns = `${netnsName(DEMO_PREFIX, 'staging')}-s`;
  const client = netns.replace(/-s$/, '-c');
  const serverAddress = '10.213.100.1';
  createNetnsPair({ server: netns, client, serverAddress, clientAddress: '10.213.100.2' });
  const children: ResultPromise[] = [];
  const inNetns = (ns: string, args: string[]): void => {
    children.push(
      execa('ip', ['netns', 'exec', ns, process.execPath, ...args], {
        reject: false,
        stdio: 'ignore',
      }),
    );
  };
  const serviceUrl = `http://${serverAddress}:${SERVICE_PORT}`;
  const staging: Staging = {
    netns,
    serviceUrl,
    startTraffic: () => inNetns(client, [script('traffic'), serviceUrl]),
    destroy() {
      for (const child of children) child.kill('SIGKILL');
      deleteNetns(netns);
      deleteNetns(client);
    },
  };
  try {
    inNetns(netns, [script('service'), serverAddress, String(SERVICE_PORT)]);
    await waitForTcp(client, serverAddress, SERVICE_PORT);
  } catch (error) {
    staging.destroy();
    throw error;
  }
  return staging;
}
