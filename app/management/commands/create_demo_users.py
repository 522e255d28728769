"""Create the demo users (idempotent): alice, bob and carol (carol is staff: the "staff" group, and
Django's is_staff, which opens the operator page /operator/)."""

from django.contrib.auth.models import Group, User
from django.core.management.base import BaseCommand

DEMO_PASSWORD = "demo"
USERS = {"alice": [], "bob": [], "carol": ["staff"]}
STAFF = {"carol"}


class Command(BaseCommand):
    help = __doc__

    def handle(self, *args, **options):
        for username, groups in USERS.items():
            user, created = User.objects.get_or_create(username=username)
            if created or not user.check_password(DEMO_PASSWORD) or user.is_staff != (username in STAFF):
                user.set_password(DEMO_PASSWORD)
                user.is_staff = username in STAFF
                user.save()
            for name in groups:
                user.groups.add(Group.objects.get_or_create(name=name)[0])
        self.stdout.write(f"demo users: {', '.join(USERS)} (password {DEMO_PASSWORD!r})")
