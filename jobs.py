"""Scheduled jobs (they replace Omi's Modal cron functions), run by APScheduler on the app's event loop.

Jobs:
- `sweep` every SWEEP_INTERVAL_S: close the conversations whose timeout passed (their client went away), and
  retake the closes a crash or a failure left `processing` once their lease (CONVERSATION_CLOSE_LEASE_S) ran out.
- `daily_notifications` every NOTIFY_CHECK_INTERVAL_S: for each user, in the user's time zone (UTC when unknown),
  a morning reminder at NOTIFY_MORNING_AT and, at NOTIFY_EVENING_AT or the hour the user chose
  (`notification_schedule`), a summary of that local day's completed conversations (none for a day without any,
  none when the user turned it off), with the `day_summary` developer webhook. A notification is due when the
  check's time falls in [at, at + interval): the checks are aligned (below), so exactly one check of each day lands
  in each window.
- `retention` once a day at 00:00 UTC when RETENTION_DAYS > 0: delete conversations started before now - days.
- `prune_job_runs` once a day at 00:00 UTC: delete the job runs (the leases below) older than JOB_RUNS_KEEP_DAYS,
  keeping each job's latest finished run (a sweep every 30 s alone adds 2,880 a day).

Once per tick across replicas. Every replica schedules every job, and the ticks of all replicas fall on the same
instants: each job's first run is aligned to a multiple of its interval since the epoch (00:00 UTC for a day).
Each tick gets a run key from its *scheduled* time (not the moment it happened to start), `"<job>:<ISO time>"`,
identical on every replica; `Storage.acquire_job_run(job, run_key, owner, JOB_LEASE_S)` lets exactly one caller
win it, the winner runs the job and records `finish_job_run(ok, detail)`. A job that raises is logged with its
traceback and recorded ok=False; the exception never reaches the scheduler, so the next tick (a new key) simply runs
again: that is the retry. A replica that dies mid-run leaves an unfinished lease, which another caller may take
once JOB_LEASE_S has passed. Each notification has its own lease as well (job `notification`, run key
`"daily_notifications:<uid>:<local date>:<morning|evening>"`), so a user gets each one once even when checks repeat.

`GET /v1/jobs` (admin key only) lists each job with its next run and last recorded result.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
import os
import secrets
import socket
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from apscheduler.events import EVENT_JOB_SUBMITTED, JobSubmissionEvent
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger
from fastapi import APIRouter, HTTPException, Request

from auth import AuthError
from config import Settings
from conversations import ConversationService, SweepIncomplete
from notification_schedule import (
    DAILY_SUMMARY_KEY,
    DAY_S,
    daily_summary_prefs,
    due_day,
    evening_time,
    may_be_evening,
    user_zone,
)
from notify import ChannelNotifier, Notifier
from storage import Storage
from storage.base import User
from webhooks.dispatcher import WebhookDispatcher
from webhooks.types import WebhookType

log = logging.getLogger(__name__)

UTC = dt.UTC
NOTIFICATION_JOB = "notification"  # the lease "job" of single notifications (one row per user, day and kind)
SUMMARY_TITLES = 5  # titles listed in the evening summary; the rest are counted
MORNING = ("Good morning", "Keep your Omi on today to capture your conversations.")

JobFunc = Callable[[float], Awaitable[str | None]]  # gets the tick's time (epoch seconds), returns the detail


class JobFailed(Exception):
    """Raised by a job that already logged its failures: recorded ok=False with this message, no traceback."""


@dataclass(frozen=True)
class _Job:
    name: str
    interval_s: float
    func: JobFunc


def instance_id() -> str:
    """This process as a lease owner: host, pid and a random part (pids repeat across containers)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def _iso(ts: float | None) -> str | None:
    return None if ts is None else dt.datetime.fromtimestamp(float(ts), UTC).isoformat(timespec="milliseconds")


class JobRunner:
    """Owns the AsyncIOScheduler. `start()` inside the running loop (the app lifespan), `await shutdown()` at exit."""

    def __init__(self, settings: Settings, storage: Storage, conversations: ConversationService,
                 notifier: Notifier | None = None, *, owner: str | None = None,
                 webhooks: WebhookDispatcher | None = None) -> None:
        self.settings = settings
        self.webhooks = webhooks  # the day_summary developer webhook goes out with the evening notification
        self.storage = storage
        self.conversations = conversations  # made with CONVERSATION_CLOSE_LEASE_S, the lease the sweep retakes after
        self._owns_notifier = notifier is None
        self.notifier = notifier if notifier is not None else ChannelNotifier(settings)
        self.owner = owner or instance_id()
        self.attempts: Counter[str] = Counter()  # ticks this runner tried, per job
        self.won: Counter[str] = Counter()  # ticks this runner won and ran, per job
        self._jobs: dict[str, _Job] = {}
        self._scheduled: dict[str, float] = {}  # job → scheduled time of the tick just submitted
        self._inflight: set[asyncio.Task] = set()
        executor_log = logging.getLogger("apscheduler.executors")
        if executor_log.level == logging.NOTSET:  # its INFO lines ("Running job ...") every tick are noise here
            executor_log.setLevel(logging.WARNING)
        self._scheduler = AsyncIOScheduler(timezone=UTC)
        self._scheduler.add_listener(self._on_submitted, EVENT_JOB_SUBMITTED)
        self.add_job("sweep", settings.sweep_interval_s, self.sweep)
        self.add_job("daily_notifications", settings.notify_check_interval_s, self.check_notifications)
        if settings.retention_days > 0:
            self.add_job("retention", DAY_S, self.retention)
        self.add_job("prune_job_runs", DAY_S, self.prune_job_runs)

    # -- scheduling ----------------------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._scheduler.running

    def add_job(self, name: str, interval_s: float, func: JobFunc) -> None:
        """Register a job (every runner of the deployment must register the same name and interval)."""
        if name in self._jobs:
            raise ValueError(f"job {name!r} exists")
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        self._jobs[name] = job = _Job(name, float(interval_s), func)
        if self.running:
            self._schedule(job)

    def start(self) -> None:
        """Start ticking (call from the running event loop). A no-op with JOBS_ENABLED=false."""
        if self.running:
            return
        if not self.settings.jobs_enabled:
            log.info("scheduled jobs disabled (JOBS_ENABLED=false)")
            return
        self._scheduler.start()
        for job in self._jobs.values():
            self._schedule(job)
        log.info("job scheduler started as %s: %s", self.owner,
                 ", ".join(f"{j.name} every {j.interval_s:g} s" for j in self._jobs.values()))

    def _schedule(self, job: _Job) -> None:
        first = math.ceil(time.time() / job.interval_s) * job.interval_s  # same instants on every replica
        trigger = IntervalTrigger(seconds=job.interval_s, start_date=dt.datetime.fromtimestamp(first, UTC),
                                  timezone=UTC)
        self._scheduler.add_job(self._tick, trigger, args=[job.name], id=job.name, name=job.name, coalesce=True,
                                max_instances=1, misfire_grace_time=max(1, math.ceil(job.interval_s)),
                                replace_existing=True)

    async def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop ticking, let running jobs finish (up to timeout_s; then they are cancelled), close the notifier."""
        if self.running:
            self._scheduler.pause()
            pending = {t for t in self._inflight if not t.done()}
            if pending:
                await asyncio.wait(pending, timeout=timeout_s)
            self._scheduler.shutdown(wait=False)  # cancels what is still running
            await asyncio.sleep(0)  # AsyncIOScheduler shuts down in a loop callback
        if self._owns_notifier:
            await self.notifier.aclose()

    def _on_submitted(self, event: JobSubmissionEvent) -> None:
        # Dispatched synchronously right after the executor created the job's task, before that task first runs.
        if event.scheduled_run_times:
            self._scheduled[event.job_id] = event.scheduled_run_times[-1].timestamp()

    async def _tick(self, name: str) -> None:
        """What the scheduler runs: the job under its lease for this tick. Never raises (but CancelledError)."""
        task = asyncio.current_task()
        if task is not None:
            self._inflight.add(task)
        try:
            job = self._jobs[name]
            scheduled = self._scheduled.pop(name, None)
            # The scheduled time is exact; the clock fallback rounds to the nearest tick (same key on every replica).
            tick = round((scheduled if scheduled is not None else time.time()) / job.interval_s) * job.interval_s
            await self._run(job, f"{name}:{_iso(tick)}", tick)
        finally:
            if task is not None:
                self._inflight.discard(task)

    async def _run(self, job: _Job, run_key: str, now: float) -> dict | None:
        """The one wrapper every run goes through. None when another owner holds this run."""
        self.attempts[job.name] += 1
        try:
            won = await self.storage.acquire_job_run(job.name, run_key, self.owner, self.settings.job_lease_s)
        except Exception:
            log.exception("job %s: could not take the lease of %s", job.name, run_key)
            return None
        if not won:
            log.debug("job %s: %s runs elsewhere", job.name, run_key)
            return None
        self.won[job.name] += 1
        started = time.monotonic()
        try:
            detail, ok = str(await job.func(now) or "done"), True
        except JobFailed as exc:
            detail, ok = str(exc), False
            log.error("job %s (%s) failed: %s", job.name, run_key, detail)
        except Exception as exc:
            detail, ok = f"{type(exc).__name__}: {exc}", False
            log.exception("job %s (%s) failed", job.name, run_key)
        else:
            log.debug("job %s (%s) done in %.2f s: %s", job.name, run_key, time.monotonic() - started, detail)
        try:
            await self.storage.finish_job_run(job.name, run_key, self.owner, ok, detail)
        except Exception:
            log.exception("job %s: could not record the result of %s", job.name, run_key)
        return {"name": job.name, "run_key": run_key, "ok": ok, "detail": detail}

    async def run_now(self, name: str, now: float | None = None) -> dict:
        """Run a job at once, outside its schedule (admin, tests), under its own lease and recorded like a tick;
        `now` is the time the job sees (default: the clock). Returns {"name", "run_key", "ok", "detail"}."""
        job = self._jobs.get(name)
        if job is None:
            raise KeyError(f"no job {name!r}")
        now = time.time() if now is None else now
        result = await self._run(job, f"{name}:manual:{uuid.uuid4().hex[:12]}", now)
        if result is None:  # the key is unique, so only a storage failure gets here
            raise RuntimeError(f"job {name}: could not take its lease")
        return result

    async def status(self) -> list[dict]:
        """Each scheduled job: name, interval_s, next_run (ISO, null when not scheduled here), last_result (the
        latest recorded run of any replica: ok, detail, finished_at, owner, run_key; null before the first)."""
        try:
            last = await self.storage.last_job_runs()
        except Exception as exc:
            log.warning("job status: storage unavailable (%s)", type(exc).__name__)
            last = {}
        out = []
        for job in self._jobs.values():
            scheduled = self._scheduler.get_job(job.name) if self.running else None
            next_run = getattr(scheduled, "next_run_time", None) if scheduled is not None else None
            run = last.get(job.name)
            out.append({
                "name": job.name,
                "interval_s": job.interval_s,
                "next_run": next_run.astimezone(UTC).isoformat(timespec="milliseconds") if next_run else None,
                "last_result": None if run is None else {
                    "ok": run["ok"], "detail": run["detail"], "finished_at": _iso(run["finished_at"]),
                    "owner": run["owner"], "run_key": run["run_key"],
                },
            })
        return out

    # -- the jobs ------------------------------------------------------------------------------------------------

    async def sweep(self, now: float | None = None) -> str:
        try:
            return f"closed {await self.conversations.close_expired()}"
        except SweepIncomplete as exc:  # each failure is logged already, with its traceback
            raise JobFailed(str(exc)) from None

    async def prune_job_runs(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        cutoff = now - self.settings.job_runs_keep_days * DAY_S
        return f"deleted {await self.storage.prune_job_runs(cutoff)} runs older than {_iso(cutoff)}"

    async def retention(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        cutoff = now - self.settings.retention_days * DAY_S
        deleted = await self.storage.delete_conversations_before(cutoff)
        if deleted:
            log.info("retention: deleted %d conversations started before %s", deleted, _iso(cutoff))
        return f"deleted {deleted} started before {_iso(cutoff)}"

    async def check_notifications(self, now: float | None = None) -> str:
        """Send the notifications due at `now` (the tick's time; injectable for tests). Each goes out once."""
        now = time.time() if now is None else now
        s = self.settings
        sent: list[str] = []
        failed: list[str] = []
        for user in await self.storage.list_users():
            tz = user_zone(user.time_zone)
            for kind, at in (("morning", s.notify_morning_at), ("evening", s.notify_evening_at)):
                if kind == "evening":  # the user's day-summary settings (enabled, local hour): read only near one
                    at = await self._evening_at(user, now, tz)
                    if at is None:
                        continue
                day = due_day(now, tz, at, s.notify_check_interval_s)
                if day is None:
                    continue
                try:
                    channel = await self._notify_once(user, tz, kind, day)
                except Exception as exc:
                    failed.append(f"{kind} {user.uid}: {type(exc).__name__}")
                    log.warning("%s notification to %s failed: %s: %s", kind, user.uid, type(exc).__name__, exc)
                else:
                    if channel is not None:
                        sent.append(f"{kind} {user.uid} via {channel}")
        detail = f"sent {len(sent)}" + (f" ({', '.join(sent[:20])})" if sent else "")
        if failed:
            raise JobFailed(f"{detail}; failed {len(failed)} ({', '.join(failed[:20])})")
        return detail

    async def _evening_at(self, user: User, now: float, tz: dt.tzinfo) -> dt.time | None:
        """The user's local time of the day summary, or None when they turned it off; storage is read only when
        one may be due (`may_be_evening`), not on every check."""
        s = self.settings
        if not may_be_evening(now, tz, s.notify_evening_at, s.notify_check_interval_s):
            return None
        stored = (await self.storage.get_user_settings(user.uid)).get(DAILY_SUMMARY_KEY)
        return evening_time(daily_summary_prefs(stored, s), s.notify_evening_at)

    async def _notify_once(self, user: User, tz: dt.tzinfo, kind: str, day: dt.date) -> str | None:
        """Send one notification under its own lease; the channel, or None (nothing to say, or sent elsewhere)."""
        if kind == "morning":
            message = MORNING
        else:
            message = await self.day_summary(user, tz, day)
            if message is None:
                return None
        run_key = f"daily_notifications:{user.uid}:{day.isoformat()}:{kind}"
        if not await self.storage.acquire_job_run(NOTIFICATION_JOB, run_key, self.owner, self.settings.job_lease_s):
            return None
        if kind == "evening" and self.webhooks is not None:  # Omi's day_summary webhook, once (under the lease)
            self.webhooks.submit_json(user.uid, WebhookType.day_summary, {
                "summary": message[1], "uid": user.uid, "created_at": dt.datetime.now(UTC).isoformat()})
        try:
            channel = await self.notifier.send(user, *message)
        except Exception as exc:
            await self.storage.finish_job_run(NOTIFICATION_JOB, run_key, self.owner, False,
                                              f"{type(exc).__name__}: {exc}")
            raise
        await self.storage.finish_job_run(NOTIFICATION_JOB, run_key, self.owner, True, channel)
        return channel

    async def day_summary(self, user: User, tz: dt.tzinfo, day: dt.date) -> tuple[str, str] | None:
        """(title, body) of the user's completed conversations started on that local day; None when there are none."""
        start = dt.datetime.combine(day, dt.time(0), tzinfo=tz).timestamp()
        end = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(0), tzinfo=tz).timestamp()
        found = []
        before, page_size = end, 100
        while True:
            page = await self.storage.list_conversations(user.uid, status="completed", limit=page_size, before=before)
            found += [c for c in page if c.started_at >= start]
            if len(page) < page_size or page[-1].started_at < start:
                break
            before = page[-1].started_at
        if not found:
            return None
        found.sort(key=lambda c: c.started_at)
        titles = [c.title or "Untitled" for c in found]
        listed = "; ".join(titles[:SUMMARY_TITLES])
        more = f"; and {len(titles) - SUMMARY_TITLES} more" if len(titles) > SUMMARY_TITLES else ""
        count = f"{len(found)} conversation{'s' if len(found) != 1 else ''}"
        return "Your day", f"{count} today: {listed}{more}"


# --- the route ---------------------------------------------------------------------------------------------------

router = APIRouter()


@router.get("/v1/jobs", summary="Scheduled jobs: next run and last result (admin key only)")
async def list_jobs(request: Request) -> list[dict]:
    st = request.app.state
    try:
        caller = await st.authenticator.caller(request.headers.get("authorization"),
                                               request.client.host if request.client else None)
    except AuthError as exc:
        raise HTTPException(401, str(exc), headers={"WWW-Authenticate": "Bearer"}) from None
    if not caller.admin:
        raise HTTPException(403, "admin only")
    jobs: JobRunner | None = getattr(st, "jobs", None)
    if jobs is None:
        raise HTTPException(503, "the job runner is not running")
    return await jobs.status()
