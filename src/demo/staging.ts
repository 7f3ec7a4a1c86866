import { fileURLToPath } from 'node:url';
import { createHosts, waitForTcp } from '../platform/local/netns.js';

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
  return {
    netns: hosts.server,
    serviceUrl,
    startTraffic: () =>
      void hosts.spawn(hosts.client, process.execPath, [script('traffic'), serviceUrl]),
    destroy: () => hosts.destroy(),
  };
}
