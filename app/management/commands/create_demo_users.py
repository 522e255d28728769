"""Create the demo users (idempotent): alice, bob and carol (carol is staff)."""

from django.contrib.auth.models import Group, User
from django.core.management.base import BaseCommand

DEMO_PASSWORD = "demo"
USERS = {"alice": [], "bob": [], "carol": ["staff"]}


class Command(BaseCommand):
    help = __doc__

    def handle(self, *args, **options):
        for username, groups in USERS.items():
            user, created = User.objects.get_or_create(username=username)
            if created or not user.check_password(DEMO_PASSWORD):
                user.set_password(DEMO_PASSWORD)
                user.save()
            for name in groups:
                user.groups.add(Group.objects.get_or_create(name=name)[0])
        self.stdout.write(f"demo users: {', '.join(USERS)} (password {DEMO_PASSWORD!r})")
