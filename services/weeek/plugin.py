"""Weeek in the target registry: contacts and deals kept in step with Klientiks (seed 002).

Weeek cannot find a contact by phone, so the entity map is the dedupe: ``client`` -> contact id (with a
hash of what was sent), ``visit`` -> deal id, ``visit-title`` / ``visit-amount`` -> what the deal last got,
``visit-status`` -> its Weeek status, ``won`` or ``lost``. Creating calls are resumable steps (``contact``,
``deal``, ``link``): a retry resumes at the first unfinished one and never makes a second contact or deal.
Updates (PATCH, move) set a state, so sending one again does no harm.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import httpx

from services.common.config import SourceConfig
from services.common.events import CloudEvent
from services.common.outcome import Outcome
from services.common.targets import Deliver, TargetSpec
from services.weeek import mapping
from services.weeek.client import WeeekClient
from services.weeek.mapping import LOST, MappingError
from services.weeek.settings import WeeekConnection

if TYPE_CHECKING:
    from services.common.delivery.steps import Steps


class _Weeek:
    def __init__(self, conn: WeeekConnection, transport: httpx.AsyncBaseTransport) -> None:
        self.conn = conn
        self.api = WeeekClient(transport, conn.base_url, conn.token.get_secret_value(), conn.timeout_s)

    async def deliver(self, action: str, event: CloudEvent, key: str, steps: Steps) -> Outcome:
        try:
            if action == "contact":
                _, out = await self.contact(event, key, steps)
                return out
            if action == "deal":
                _, out = await self.ensure_deal(event, key, steps, self.conn.status_id)
                return out
            if action == "deal-change":
                return await self.change(event, key, steps)
            if action == "deal-paid":
                return await self.paid(event, key, steps)
        except MappingError as e:
            return Outcome.permanent(str(e), hint=e.hint)
        return Outcome.permanent(f"unknown Weeek action {action!r}")

    async def contact(
        self, event: CloudEvent, key: str, steps: Steps, *, update: bool = True
    ) -> tuple[str | None, Outcome]:
        """The client's contact: from the map (updated if the event's data changed, when ``update``), else created.

        A deal's saga uses a known contact as it is: a booking carries less of the client than the client
        event did, and must not thin the contact out.
        """
        client = mapping.client_id(event)
        made = await steps.result("contact")
        known = await steps.known("client", client)
        if made is not None:  # made by this delivery's earlier attempt
            if known is None or known.target_id != made:
                await steps.remember("client", client, made, mapping.fingerprint(mapping.contact_body(event)))
            return made, Outcome.success("contact created in an earlier attempt", target_ref=made)
        if known is not None and known.pending:
            return None, _doubt("the contact", event)
        if known is not None and not update:
            return known.target_id, Outcome.success("the client has a contact", target_ref=known.target_id)
        body = mapping.contact_body(event)
        sent = mapping.fingerprint(body)
        if known is None:
            await steps.claim("client", client)
            out = await self.api.create_contact(body, key=f"{key}/contact")
            if not out.ok:
                return None, await _settle(steps, "client", client, out, "the contact", event)
            if not out.target_ref:
                return None, Outcome.permanent("Weeek created the contact but sent no id")
            await steps.finish("contact", out.target_ref)
            await steps.remember("client", client, out.target_ref, sent)
            return out.target_ref, out
        if known.content_hash == sent:
            return known.target_id, Outcome.success("the contact has this data", target_ref=known.target_id)
        out = await self.api.update_contact(known.target_id, body, key=f"{key}/contact-update")
        if not out.ok:
            return None, out
        await steps.remember("client", client, known.target_id, sent)
        return known.target_id, Outcome.success("contact updated", target_ref=known.target_id)

    async def ensure_deal(
        self, event: CloudEvent, key: str, steps: Steps, status_id: str
    ) -> tuple[str | None, Outcome]:
        """The visit's deal: from the map, else created in ``status_id`` and linked to the client's contact."""
        visit = mapping.visit_id(event)
        deal = await steps.result("deal")
        known = await steps.known("visit", visit)
        if deal is None:
            if known is not None:
                if known.pending:
                    return None, _doubt("the deal", event)
                return known.target_id, Outcome.success("the visit has its deal", target_ref=known.target_id)
            body = mapping.deal_body(event, self.conn)
            await steps.claim("visit", visit)
            out = await self.api.create_deal(status_id, body, key=f"{key}/deal")
            if not out.ok:
                return None, await _settle(steps, "visit", visit, out, "the deal", event)
            if not out.target_ref:
                return None, Outcome.permanent("Weeek created the deal but sent no id")
            deal = out.target_ref
            await steps.finish("deal", deal)  # this delivery made it: the link follows
            await steps.remember("visit-title", visit, body["title"])
            await steps.remember("visit-status", visit, status_id)
            if "amount" in body:
                await steps.remember("visit-amount", visit, str(body["amount"]))
            known = None
        if known is None or known.target_id != deal:
            await steps.remember("visit", visit, deal)
        if event.data.client is not None and event.data.client.id and await steps.result("link") is None:
            contact, out = await self.contact(event, key, steps, update=False)
            if contact is None:
                return None, out
            out = await self.api.link_contact(deal, contact, key=f"{key}/link")
            if not out.ok:
                return None, out
            await steps.finish("link", contact)
        return deal, Outcome.success("deal created", target_ref=deal)

    async def _patch(
        self, steps: Steps, visit: str, deal: str, patch: dict[str, object], key: str
    ) -> Outcome:
        """Send what of ``patch`` differs from what the deal last got; nothing if all is the same."""
        changed = {}
        for field, kind in (
            ("title", "visit-title"),
            ("amount", "visit-amount"),
            ("winStatus", "visit-win"),
        ):
            if field in patch:
                last = await steps.entity(kind, visit)
                if last is None or last.target_id != str(patch[field]):
                    changed[field] = patch[field]
        if not changed:
            return Outcome.success("the deal has this data")
        out = await self.api.update_deal(deal, changed, key=key)
        if out.ok:
            for field, kind in (
                ("title", "visit-title"),
                ("amount", "visit-amount"),
                ("winStatus", "visit-win"),
            ):
                if field in changed:
                    await steps.remember(kind, visit, str(changed[field]))
        return out

    async def change(self, event: CloudEvent, key: str, steps: Steps) -> Outcome:
        """Update the deal's title and amount; lose it on a cancelling status, or move it as mapped."""
        visit = mapping.visit_id(event)
        lost, to = mapping.lost(event, self.conn), mapping.moved_to(event, self.conn)
        deal, out = await self.ensure_deal(event, key, steps, to or self.conn.status_id)
        if deal is None:
            return out
        out = await self._patch(steps, visit, deal, mapping.change_patch(event, self.conn), f"{key}/update")
        if not out.ok:
            return out
        if to is not None:
            current = await steps.entity("visit-status", visit)
            if current is None or current.target_id != to:
                out = await self.api.move_deal(deal, to, key=f"{key}/move")
                if not out.ok:
                    return out
                await steps.remember("visit-status", visit, to)
        if lost:
            return await self._patch(steps, visit, deal, {"winStatus": LOST}, f"{key}/lost")
        return Outcome.success(target_ref=deal)

    async def paid(self, event: CloudEvent, key: str, steps: Steps) -> Outcome:
        """The visit's deal (created first if none) is won, with the paid amount."""
        visit = mapping.visit_id(event)
        deal, out = await self.ensure_deal(event, key, steps, self.conn.status_id)
        if deal is None:
            return out
        out = await self._patch(steps, visit, deal, mapping.won_patch(event, self.conn), f"{key}/won")
        return out if not out.ok else Outcome.success(out.reason, target_ref=deal)


def _doubt(what: str, event: CloudEvent) -> Outcome:
    # Weeek has no idempotency key and no search by phone: a create that may have arrived is not resent.
    return Outcome.in_doubt(
        what, f"look for it in Weeek; if it is missing, replay: relay dlq replay --event-id {event.id}"
    )


async def _settle(steps: Steps, kind: str, ident: str, out: Outcome, what: str, event: CloudEvent) -> Outcome:
    """A failed create: in doubt if it may have arrived, else free to be created again."""
    if out.maybe_sent:
        return _doubt(what, event)
    await steps.release(kind, ident)
    return out


def deliverer(source: SourceConfig, conn: WeeekConnection, transport: httpx.AsyncBaseTransport) -> Deliver:
    """One Weeek workspace: contacts and deals for the connection's events."""
    return _Weeek(conn, transport).deliver


TARGET = TargetSpec(
    name="weeek",
    title="Weeek",
    connection=WeeekConnection,
    deliverer=deliverer,
    port=8084,
    sandbox_port=8093,
    sandbox_secret=("--token-file", "weeek-token"),
    commands="services.weeek.commands",
    demo=lambda url, key: _demo(url, key),
)


def _demo(url: str, key: str) -> dict[str, object]:
    """The demo connection to the sandbox's seeded funnel (its ids are fixed: services/sandbox/weeek.py)."""
    from services.sandbox.weeek import SEED_FUNNEL_NAME, status_id

    def status(name: str) -> str:
        return status_id(SEED_FUNNEL_NAME, name)

    return {
        "target": "weeek",
        "base_url": f"{url}/public/v1",
        "token": key,
        "status_id": status("Новая заявка"),
        "status_map": {"confirmed": status("Записан"), "finished": status("Пришёл")},
    }
