/**
 * A session that something else starts the app for (an editor's debugger, a script): what the
 * app's process must be started with to join it, and when it is gone.
 */
import { readFileSync } from 'node:fs';
import type { LayerChannel } from './layer-channel.js';

/**
 * How often the joined processes are looked at. No event says that another process's child
 * exited (a pidfd would, but Node has none), and its connection to the layer channel closing is
 * not it: an exec closes it too, and the new program joins again.
 */
const LOOK_MS = 250;
/**
 * How long the session waits, once every process that joined has exited, for another to join.
 * A debugger may run the program's runtime once before the program itself (js-debug runs node
 * with its bootloader, which opens the inspector, and so joins, then exits): the program joins
 * within this of the first one's end, and the session goes on.
 */
const LINGER_MS = 2000;

/**
 * The variables a process sets to join the session: the layer, the channel and its token, the
 * features' settings, and what the app's environment differs in from this process's (the
 * target's variables and the overrides).
 */
export function joinEnvironment(
  layer: LayerChannel,
  layerSettings: Record<string, string>,
  appEnv: Record<string, string> | undefined,
): Record<string, string> {
  const changed = Object.entries(appEnv ?? {}).filter(
    ([name, value]) => process.env[name] !== value,
  );
  return {
    ...Object.fromEntries(changed),
    ...layerSettings,
    ...layer.variables(),
  };
}

/** Whether `pid` is a process that has not exited: a zombie has, it only waits to be reaped. */
function running(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) !== 'Z';
  } catch {
    return false;
  }
}

/**
 * Resolves with the pids of the processes that joined the session, once every one of them has
 * exited and none joined for LINGER_MS after. A process joins when it first uses the session
 * (listens, opens one of the target's files, connects through it): a session that none joins is
 * never ended this way, it lasts until it is stopped.
 */
export function joinedExit(layer: LayerChannel): Promise<number[]> {
  return new Promise((resolve) => {
    // A set: a process joins again after an exec, and its pid is one process.
    const joined = new Set<number>();
    let allGoneAt: number | undefined;
    let look: NodeJS.Timeout | undefined;
    layer.on('join', ({ pid }) => {
      joined.add(pid);
      allGoneAt = undefined;
      look ??= setInterval(() => {
        if ([...joined].some(running)) return;
        allGoneAt ??= Date.now();
        if (Date.now() - allGoneAt < LINGER_MS) return;
        clearInterval(look);
        resolve([...joined]);
      }, LOOK_MS);
      // The session may end first, for another reason: this must not keep the CLI alive.
      look.unref();
    });
  });
}
