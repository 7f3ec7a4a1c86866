import { isStale } from '../src/platform/local/netns.js';
import { removeLeftovers } from './support/leftovers.js';

/** A killed earlier run may have left namespaces and cgroups behind: remove them first. */
export default function globalSetup(): void {
  const stale = removeLeftovers(isStale);
  if (stale.length) console.log(`removed leftovers of an earlier run: ${stale.join(', ')}`);
}
