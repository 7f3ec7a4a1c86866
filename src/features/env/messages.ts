/**
 * The `env` feature's messages: the CLI asks for the target's environment (an empty body), the
 * agent answers with its variables as `[name, value]` pairs, in the target's order.
 */
import { ProtocolError, type WireValue } from '../../protocol/messages.js';

export const ENV_FEATURE = 'env';

export type Variables = [name: string, value: string][];

export function envReplyBody(variables: Variables): WireValue {
  return variables;
}

/** Checks the agent's reply; throws {@link ProtocolError}. */
export function parseEnvReply(body: WireValue): Variables {
  if (!Array.isArray(body)) throw new ProtocolError('env reply: expected a list of pairs');
  return body.map((pair, i) => {
    if (
      !Array.isArray(pair) ||
      pair.length !== 2 ||
      typeof pair[0] !== 'string' ||
      typeof pair[1] !== 'string'
    ) {
      throw new ProtocolError(`env reply[${i}]: expected [name, value] strings`);
    }
    return [pair[0], pair[1]];
  });
}
