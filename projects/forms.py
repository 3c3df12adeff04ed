from django import forms
from django.contrib.auth.forms import AuthenticationForm
from django.utils.text import slugify

from projects.models import Engine, Membership, Project, clone_url_problem


class LoginForm(AuthenticationForm):
    username = forms.CharField(
        label="E-mail", widget=forms.TextInput(attrs={"autofocus": True, "autocomplete": "username"})
    )


class MemberForm(forms.Form):
    email = forms.EmailField(label="E-mail", help_text="Of someone who already has an account.")
    role = forms.ChoiceField(choices=Membership.Role.choices, initial=Membership.Role.MEMBER)


class ProjectForm(forms.Form):
    name = forms.CharField(max_length=100, widget=forms.TextInput(attrs={"autofocus": True}))
    slug = forms.SlugField(
        max_length=50,
        required=False,
        help_text="In URLs and webhook addresses. Leave empty to derive it from the name.",
    )
    repo_clone_url = forms.CharField(
        label="Repository URL",
        max_length=500,
        required=False,
        help_text="The Git clone URL, e.g. https://github.com/acme/vision.git. You can link it later.",
    )
    repo_web_url = forms.URLField(
        label="Repository web page", max_length=500, required=False, help_text="Optional: for links to commits."
    )
    engines = forms.ModelMultipleChoiceField(
        queryset=Engine.objects.all(),
        widget=forms.CheckboxSelectMultiple,
        label_suffix="",
        help_text="Where its experiments may run; the first checked (in this order) is the default.",
    )

    def clean(self):
        data = super().clean()
        name = data.get("name")
        derived = not data.get("slug")
        if name and derived:
            data["slug"] = slugify(name)[:50]
            if not data["slug"]:
                self.add_error("slug", "Choose a slug: the name has no letters or digits to derive one from.")
        if data.get("slug") and Project.objects.filter(slug=data["slug"]).exists():
            self.add_error("name" if derived else "slug", f"A project with the slug {data['slug']} already exists.")
        problem = clone_url_problem(data.get("repo_clone_url", ""))
        if problem:
            self.add_error("repo_clone_url", problem)
        return data
