/**
 * Puts a session's environment into a resolved debug configuration, for every debugger: each
 * takes the debuggee's environment in its own key. No `vscode` here, so that it is tested alone.
 */

/** The part of a debug configuration this module reads and writes. */
export interface DebugConfigurationLike {
  type: string;
  request: string;
  name: string;
  [key: string]: unknown;
}

/** `environment: [{ name, value }]`: the C/C++ debuggers' (cppdbg, cppvsdbg) form. */
interface NamedValue {
  name: string;
  value: string;
}

/** Variables whose values are lists, where the session's entry goes first and the user's stay. */
const LISTS: Record<string, string> = { LD_PRELOAD: ':' };

/** `value` with `first` before it in a list variable, or `first` alone. */
function merged(name: string, first: string, value: string | undefined | null): string {
  const separator = LISTS[name];
  if (separator === undefined || !value) return first;
  const firstEntries = first.split(separator);
  const kept = value.split(separator).filter((entry) => entry && !firstEntries.includes(entry));
  return [...firstEntries, ...kept].join(separator);
}

/** A configuration's environment object (`env`), copied, or a new one. */
function envObject(value: unknown): Record<string, string | null> {
  return typeof value === 'object' && value !== null && !Array.isArray(value)
    ? { ...(value as Record<string, string | null>) }
    : {};
}

function isNamedValue(entry: unknown): entry is NamedValue {
  return typeof entry === 'object' && entry !== null && 'name' in entry && 'value' in entry;
}

/**
 * Why a configuration cannot join a session, or undefined when it can: an `attach`
 * configuration's process runs already, and no environment reaches it.
 */
export function unjoinable(configuration: DebugConfigurationLike): string | undefined {
  return configuration.request === 'launch'
    ? undefined
    : `"${configuration.name}" attaches to a process that runs already: only a process the debugger launches joins a mirrord session`;
}

/**
 * The (launch) configuration with the session's variables in the debuggee's environment. Node
 * (js-debug: node, pwa-node), Python (debugpy: python, debugpy), Go (go), CodeLLDB (lldb) and
 * most others take an `env` object; the C/C++ debuggers take an `environment` list of
 * `{ name, value }`, used when the configuration has one. Variables the configuration sets
 * itself win, except lists such as LD_PRELOAD, where the layer goes first and the user's entries
 * follow.
 */
export function withSessionEnvironment(
  configuration: DebugConfigurationLike,
  session: Record<string, string>,
): DebugConfigurationLike {
  if (Array.isArray(configuration.environment)) {
    const environment = configuration.environment.filter(isNamedValue);
    const own = new Map(environment.map((entry) => [entry.name, entry.value]));
    const added: NamedValue[] = [];
    for (const [name, value] of Object.entries(session)) {
      if (name in LISTS || !own.has(name)) {
        added.push({ name, value: merged(name, value, own.get(name)) });
      }
    }
    const addedNames = new Set(added.map((entry) => entry.name));
    return {
      ...configuration,
      environment: [...environment.filter((entry) => !addedNames.has(entry.name)), ...added],
    };
  }
  const env = envObject(configuration.env);
  for (const [name, value] of Object.entries(session)) {
    if (name in LISTS) env[name] = merged(name, value, env[name]);
    else if (!(name in env)) env[name] = value;
  }
  return { ...configuration, env };
}
