/** Whether an app took a connection off its listen queue, from the kernel's TCP tables. */
import { readFileSync } from 'node:fs';
import { waitFor } from './wait.js';

/** A port as /proc/net/tcp{,6} print it after an address. */
const procPort = (port: number): string => `:${port.toString(16).toUpperCase().padStart(4, '0')}`;

/**
 * Whether the app has accepted the connection from `clientPort` to its `appPort` (in this network
 * namespace): the kernel gives a connection's socket an inode (the tenth column of
 * /proc/net/tcp{,6}) only when accept() makes a file of it.
 */
export function accepted(appPort: number, clientPort: number): boolean {
  const local = procPort(appPort);
  const remote = procPort(clientPort);
  return ['/proc/net/tcp', '/proc/net/tcp6'].some((table) =>
    readFileSync(table, 'latin1')
      .split('\n')
      .some((row) => {
        const [, from, to, , , , , , , inode] = row.trim().split(/\s+/);
        return (
          from?.endsWith(local) && to?.endsWith(remote) && inode !== undefined && inode !== '0'
        );
      }),
  );
}

/**
 * Resolves once the app has accepted the connection from `clientPort` to `appPort`: a layered
 * app that listens alone then waits for the session to push the connection's client.
 */
export async function untilAccepted(appPort: number, clientPort: number): Promise<void> {
  await waitFor(
    `the app to accept the connection from port ${clientPort}`,
    () => accepted(appPort, clientPort),
    { ms: 10_000, everyMs: 5 },
  );
}
